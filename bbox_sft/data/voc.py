"""Pascal VOC XML (CVAT, LabelImg, Roboflow, the VOC devkit) -> labelled boxes per image.

``Annotations/*.xml`` + ``JPEGImages/`` (the devkit's and CVAT's export; ``ImageSets/Main/train.txt``,
``val.txt``, ``test.txt`` give the splits when present), or XML files beside their images
(LabelImg, Roboflow's split folders). The image of an XML file is its ``<filename>``, else the image
with its stem. Each ``<object>`` is read by supervision (``detections_from_xml_obj``: ``<bndbox>`` as
1-based inclusive pixel indices), one object at a time, so one bad object costs one box, counted; an
XML file that does not parse costs its image (counted in ``unreadable_files``), never the build.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

from ..formats import LabelledBox
from .detections import DetectionAnnotations, Layout, pixel_box
from .sources import IMAGE_SUFFIXES

VOC_SPLITS = {"train": "train", "val": "validation", "test": "test"}


class VocLayout(Layout):
    """One split of a Pascal VOC export: XML files, their images and (devkit) the stems the split lists."""

    name = "voc"
    description = "Pascal VOC XML (Annotations/ + JPEGImages/, or .xml files beside their images)"

    def __init__(self, xml_dir: Path, image_dir: Path, stems: list[str] | None = None) -> None:
        self.xml_dir, self.image_dir, self.stems = xml_dir, image_dir, stems
        self._images: dict[Path, Path] | None = None
        self._roots: dict[Path, ElementTree.Element | ElementTree.ParseError] = {}

    @classmethod
    def find(cls, folder: Path) -> VocLayout | None:
        if (folder / "Annotations").is_dir() and any((folder / "Annotations").glob("*.xml")):
            images = next((folder / n for n in ("JPEGImages", "images") if (folder / n).is_dir()), folder)
            return cls(folder / "Annotations", images)
        if any(folder.glob("*.xml")):
            return cls(folder, folder)
        return None

    @classmethod
    def splits(cls, root: Path) -> dict[str, VocLayout] | None:
        """The devkit's splits (``ImageSets/Main/{train,val,test}.txt``), or None."""
        found = cls.find(root)
        lists = root / "ImageSets" / "Main"
        if found is None or not any((lists / f"{name}.txt").is_file() for name in VOC_SPLITS):
            return None
        return {split: cls(found.xml_dir, found.image_dir, (lists / f"{name}.txt").read_text().split())
                for name, split in VOC_SPLITS.items() if (lists / f"{name}.txt").is_file()}

    @property
    def source(self) -> str:
        return str(self.xml_dir)

    def xml_files(self) -> list[Path]:
        files = sorted(self.xml_dir.glob("*.xml"))
        return files if self.stems is None else [f for f in files if f.stem in set(self.stems)]

    def images(self) -> dict[Path, Path]:
        """XML file -> its image (``<filename>`` when that file exists, else the image with the XML's stem);
        each file is parsed here once, its tree (or its parse error) kept for :meth:`read`."""
        if self._images is None:
            by_stem = {p.stem: p for p in sorted(self.image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
            self._images, self._roots = {}, {}
            for xml in self.xml_files():
                try:
                    self._roots[xml] = ElementTree.parse(xml).getroot()
                except ElementTree.ParseError as error:
                    self._roots[xml] = error
                named = self._roots[xml].findtext("filename") if not isinstance(self._roots[xml], Exception) else None
                image = self.image_dir / named if named and (self.image_dir / named).is_file() else None
                self._images[xml] = image or by_stem.get(xml.stem) or self.image_dir / f"{xml.stem}.jpg"
        return self._images

    def image_paths(self) -> list[str]:
        return [str(p) for p in self.images().values()]

    def read(self, sizes: dict[str, tuple[int, int]]) -> DetectionAnnotations:
        from supervision.dataset.formats.pascal_voc import detections_from_xml_obj

        read = DetectionAnnotations([], [])
        names: set[str] = set()
        for xml, image in self.images().items():
            root = self._roots[xml]
            if isinstance(root, ElementTree.ParseError):
                read.unreadable_files.append({"image": str(image), "file": str(xml), "reason": "unreadable_annotation",
                                              "detail": f"XML does not parse: {root}"})
                continue
            size, objects, lost = sizes.get(str(image)), [], Counter()
            for number, element in enumerate(root.findall("object"), 1):
                where = f"{xml.name}: object {number}"
                reason, box, label = None, None, (element.findtext("name") or "").strip()
                if size is None:
                    reason = "image_skipped"
                else:
                    alone = ElementTree.Element("annotation")
                    alone.append(element)
                    try:
                        found, _ = detections_from_xml_obj(alone, [], resolution_wh=(1, 1))
                        x0, y0, x1, y1 = (float(v) for v in found.xyxy[0])
                    except (ValueError, IndexError) as error:
                        reason, where = "bad_bbox", f"{where} ({error})"
                    else:
                        box, note = pixel_box(x0, y0, x1, y1, *size)
                        reason = "no_label" if not label else note if box is None else None
                        if box is not None and note and reason is None:
                            read.fixed[note] += 1
                if reason is not None:
                    read.skip(reason, where)
                    lost[reason] += 1
                else:
                    names.add(label)
                    objects.append(LabelledBox(label, box))
            read.add(image.stem, str(image), size, objects, lost)
        read.categories = sorted(names)  # VOC declares no class list: the names its objects use
        return read
