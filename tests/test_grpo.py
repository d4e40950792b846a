"""The GRPO stage: the tasks' rewards against values computed here, rollouts sampled hot inside every grammar, the
loss's log-probabilities against the model's own logits (forced tokens: 0, no gradient), what the recipe refuses,
and a short run under accelerate whose adapter eval, predict and serve load."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torchvision.ops import box_iou
from transformers import AutoModelForImageTextToText

from bbox_sft.boxes import Box
from bbox_sft.decoding import ForcedTokenDecoder, prompt_text
from bbox_sft.formats import LabelledBox
from bbox_sft.grpo_trainer import reward_function
from bbox_sft.metrics import box_metrics
from bbox_sft.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny_grpo_cpu.yaml")


def _iou(a, b) -> float:
    """IoU by torchvision, not by the package's own function."""
    return float(box_iou(torch.tensor([list(a)], dtype=torch.float64), torch.tensor([list(b)], dtype=torch.float64)))


@st.composite
def boxes(draw) -> Box:
    x0, x1 = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2, unique=True)))
    y0, y1 = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2, unique=True)))
    return Box(x0, y0, x1, y1)


@st.composite
def labelled(draw, max_size: int = 4) -> list[LabelledBox]:
    return draw(st.lists(st.builds(LabelledBox, st.sampled_from(["cat", "dog"]), boxes()), max_size=max_size))


def _best_matching(predicted, truth) -> float:
    """The largest total IoU of a one-to-one, same-label assignment, by trying every assignment."""
    best = 0.0
    for k in range(min(len(predicted), len(truth)) + 1):
        for chosen in itertools.permutations(range(len(predicted)), k):
            for targets in itertools.combinations(range(len(truth)), k):
                total = sum(_iou(predicted[p].box, truth[t].box) for p, t in zip(chosen, targets)
                            if predicted[p].label == truth[t].label)
                best = max(best, total)
    return best


# --- rewards ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["subject", "refer"])
@given(answer=boxes(), truth=boxes(), bonus=st.sampled_from([0.0, 0.5]))
@settings(max_examples=60, deadline=None)
def test_a_box_reward_is_the_iou_with_the_truth_and_the_bonus_at_a_hit(task, answer, truth, bonus) -> None:
    expected = _iou(answer, truth)
    reward = get_task(task).reward([answer], [truth], bonus)[0]
    hit = box_metrics([answer], [truth])["success@0.5"] == 1.0
    assert reward == pytest.approx(expected + (bonus if hit else 0.0), abs=1e-9)
    assert get_task(task).reward([None], [truth], bonus) == [0.0]  # an answer that did not parse


def test_the_hit_bonus_starts_at_iou_one_half_inclusive() -> None:
    task, truth = get_task("subject"), Box(0.0, 0.0, 1.0, 1.0)
    half, under = Box(0.0, 0.0, 0.5, 1.0), Box(0.0, 0.0, 0.4999, 1.0)
    assert _iou(half, truth) == 0.5
    assert task.reward([half, under], [truth, truth], bonus=1.0) == pytest.approx([1.5, 0.4999])
    objects = get_task("objects")
    assert objects.reward([[LabelledBox("cat", half)]], [[LabelledBox("cat", truth)]], bonus=1.0) == [1.5]
    assert objects.reward([[LabelledBox("cat", under)]], [[LabelledBox("cat", truth)]], 1.0)[0] == pytest.approx(0.4999)


@pytest.mark.parametrize("task", ["objects", "phrase"])
@given(answer=labelled(), truth=labelled())
@settings(max_examples=60, deadline=None)
def test_a_list_reward_is_the_best_one_to_one_matching_over_the_longer_list(task, answer, truth) -> None:
    reward = get_task(task).reward([answer], [truth])[0]
    if not answer and not truth:
        assert reward == 1.0  # nothing there, nothing said: a full score
    else:
        assert reward == pytest.approx(_best_matching(answer, truth) / max(len(answer), len(truth)), abs=1e-9)


@given(truth=labelled(), order=st.randoms(use_true_random=False), bonus=st.sampled_from([0.0, 0.5]))
@settings(max_examples=40, deadline=None)
def test_the_true_list_scores_full_marks_in_any_order(truth, order, bonus) -> None:
    answer = list(truth)
    order.shuffle(answer)
    assert get_task("objects").reward([answer], [truth], bonus)[0] == pytest.approx(1.0 + (bonus if truth else 0))


@given(answer=labelled(), truth=labelled(), extra=st.lists(boxes(), min_size=1, max_size=3),
       bonus=st.sampled_from([0.0, 0.5]))
@settings(max_examples=80, deadline=None)
def test_boxes_that_find_nothing_never_raise_a_list_reward(answer, truth, extra, bonus) -> None:
    """Spraying boxes does not pay (the reward hacking reported for mAP rewards): a box of a label the image does
    not hold adds nothing and, once the answer is as long as the truth, costs a share."""
    task = get_task("objects")
    before = task.reward([answer], [truth], bonus)[0]
    after = task.reward([answer + [LabelledBox("zebra", b) for b in extra]], [truth], bonus)[0]
    assert after <= before + 1e-12
    if before > 0 and len(answer) >= len(truth):
        assert after < before


@given(box=boxes(), truth=boxes(), copies=st.integers(2, 6))
@settings(max_examples=40, deadline=None)
def test_copies_of_one_box_on_one_object_share_its_score(box, truth, copies) -> None:
    task = get_task("objects")
    one = task.reward([[LabelledBox("cat", box)]], [[LabelledBox("cat", truth)]])[0]
    many = task.reward([[LabelledBox("cat", box)] * copies], [[LabelledBox("cat", truth)]])[0]
    assert many == pytest.approx(one / copies, abs=1e-12)


def test_empty_answers_score_by_what_the_image_holds() -> None:
    task, cat = get_task("objects"), LabelledBox("cat", Box(0.1, 0.1, 0.5, 0.5))
    assert task.reward([[], [], [cat], None], [[], [cat], [], []]) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("task", ["subject", "objects", "phrase", "refer"])
def test_the_reward_function_reads_its_truth_from_the_columns_trl_passes(task) -> None:
    """TRL calls ``f(prompts=, completions=, completion_ids=, **columns)``, every dataset column a list."""
    spec = get_task(task)
    truth = ([LabelledBox("cat", Box(0.1, 0.2, 0.5, 0.6)), LabelledBox("dog", Box(0.5, 0.5, 0.9, 0.9))]
             if spec.answers_list else Box(0.1, 0.2, 0.5, 0.6))
    answers = ([truth[:1], truth, []] if spec.answers_list else
               [Box(0.1, 0.2, 0.5, 0.6), Box(0.1, 0.2, 0.3, 0.6), Box(0.6, 0.6, 0.9, 0.9)])
    texts = [spec.answer_text(a, "json") for a in answers]
    columns = ({"labels": [[o.label for o in truth]] * 3, "boxes": [[list(o.box) for o in truth]] * 3}
               if spec.answers_list else {"box": [list(truth)] * 3})
    reward = reward_function(spec, bonus=0.0)
    got = reward(prompts=[[{"role": "user", "content": "q"}]] * 3, completion_ids=[[1]] * 3,
                 completions=[[{"role": "assistant", "content": t}] for t in texts], image=[None] * 3,
                 query=["cat"] * 3, **columns)
    if spec.answers_list:
        assert got == pytest.approx([0.5, 1.0, 0.0])
    else:
        assert got == pytest.approx([1.0, _iou((0.1, 0.2, 0.3, 0.6), tuple(truth)), 0.0])


# --- rollouts -----------------------------------------------------------------------------------------------------

ROLLOUT_CASES = [(task, answer_format) for task in ("subject", "objects", "phrase", "refer")
                 for answer_format in ("json", "qwen")]


@pytest.mark.parametrize(("task", "answer_format"), ROLLOUT_CASES)
def test_rollouts_sampled_hot_stay_inside_each_rows_grammar(task, answer_format, tiny_model_dir, box_dataset_dir,
                                                             processor) -> None:
    """A random model sampled at temperature 3: every token of every answer was allowed by its own row's grammar
    (phrase rows each name their own labels), every answer ends, parses, and they differ."""
    spec = get_task(task)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    images = datasets.load_from_disk(str(box_dataset_dir))["train"]["image"][:6] * 4
    labels = ["cat", "dog", "traffic light"]
    queries = [["cat", "dog"][i % 2] if task == "phrase" else "the red ellipse" for i in range(len(images))]
    grammars = [spec.grammar(processor.tokenizer, answer_format, labels, q if spec.takes_query else None, 4)
                for q in queries]
    texts = [prompt_text(processor, spec.instruction(q if spec.takes_query else None)) for q in queries]
    batch = processor(text=texts, images=[[i.convert("RGB")] for i in images], padding=True, padding_side="left",
                      return_tensors="pt")
    budget = max(spec.token_budget(g) for g in grammars)
    decoder = ForcedTokenDecoder(model, grammars, processor.tokenizer.pad_token_id, max_new_tokens=budget,
                                 temperature=3.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        written, _, _ = decoder.decode(batch)
    answers = []
    for grammar, ids, logps in zip(grammars, written, decoder.sampled_logps):
        for t, token in enumerate(ids):
            assert token in grammar.allowed(ids[:t]), (t, ids)
        assert ids[-1] == grammar.eos
        assert set(logps) == {t for t in range(len(ids)) if len(grammar.allowed(ids[:t])) > 1}
        assert all(v <= 0 for v in logps.values())
        text = processor.tokenizer.decode(ids, skip_special_tokens=True)
        answers.append(spec.parse(text))
        assert answers[-1] is not None, text
    assert len({repr(a) for a in answers}) >= len(answers) // 3
    if spec.answers_list:
        assert max(len(a) for a in answers) >= 2  # hot sampling writes lists, not only the untrained empty one
        if task == "phrase":
            assert all(o.label == q for a, q in zip(answers, queries) for o in a)


# --- the loss's log-probabilities ---------------------------------------------------------------------------------

def _trainer(model_dir: Path, dataset_dir: Path, out: Path, *extra: str):
    from bbox_sft.grpo import build_trainer, parse_args

    return build_trainer(*parse_args([
        RECIPE, "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset_dir), "--output_dir", str(out),
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--save_strategy", "no", "--disable_tqdm", "true", *extra]))


def _scores(trainer, inputs, allowed=None):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    multimodal = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")}
    with trainer._constrained(inputs["allowed"] if allowed is None else allowed):
        # in chunks of 3 rows, as TRL scores a generation batch larger than a device's batch
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, inputs["completion_ids"].size(1), batch_size=3, compute_entropy=True,
            **multimodal)
    return ids, mask, multimodal, logps, entropy


@pytest.mark.parametrize("task", ["subject", "objects"])
def test_the_loss_scores_each_token_among_those_its_grammar_allowed(task, adapter_dir, box_dataset_dir, objects_run,
                                                                    tmp_path) -> None:
    """The constrained log-probabilities and entropies equal a log-softmax of the model's own full logits over
    each step's allowed tokens at the temperature; a forced token has log-probability 0 and no gradient, and the
    loss counts decisions only; the sampler's log-probabilities are the loss's (the gap is measured here)."""
    model_dir, data = ((adapter_dir, box_dataset_dir) if task == "subject" else
                       (objects_run["out"], objects_run["out"].parent / "objects"))
    trainer = _trainer(model_dir, data, tmp_path, "--temperature", "1.5")
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._generate_and_score_completions(batch)  # in order: the sampler's rows are these
    allowed = inputs["allowed"]
    ids, mask, multimodal, logps, entropy = _scores(trainer, inputs)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=mask, **{k: v for k, v in multimodal.items()
                                                                       if k != "num_images"}).logits.float()
    start = inputs["prompt_ids"].size(1)
    gap, forced, decisions = 0.0, 0, 0
    for row in range(ids.size(0)):
        for step in range(inputs["completion_ids"].size(1)):
            options = [t for t in allowed[row, step].tolist() if t >= 0]
            if not inputs["completion_mask"][row, step]:
                assert not options and logps[row, step] == 0
                continue
            among = (logits[row, start + step - 1, options] / 1.5).log_softmax(-1)
            token = int(inputs["completion_ids"][row, step])
            assert float(logps[row, step]) == pytest.approx(float(among[options.index(token)]), abs=2e-5)
            assert float(entropy[row, step]) == pytest.approx(float(-(among.exp() * among).sum()), abs=2e-5)
            if len(options) == 1:
                forced += 1
                assert logps[row, step] == 0 and entropy[row, step] == 0
                assert int(inputs["tool_mask"][row, step]) == 0
            else:
                decisions += 1
                assert int(inputs["tool_mask"][row, step]) == 1
                gap = max(gap, abs(trainer.sampler_logps[row][step] - float(logps[row, step])))
    assert forced and decisions
    assert int(inputs["num_items_in_batch"]) == decisions
    assert gap < 1e-4, gap  # the sampler (cached, batched decoding) against the loss's forward: measured ~1e-6
    print(f"\n{task}: {decisions} decisions, {forced} forced tokens, sampler/loss log-prob gap {gap:.2e}")

    # gradients: through the decisions, none through the forced tokens
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for only_forced in (True, False):
        trainer.model.zero_grad()
        chosen = (allowed[..., 1] < 0) & (allowed[..., 0] >= 0)
        _, _, _, train_logps, _ = _scores(trainer, inputs)
        (train_logps * (chosen if only_forced else ~chosen)).sum().backward()
        total = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
        assert (total == 0) == only_forced, total


# --- what the recipe refuses --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    (["--top_p", "0.9"], "top_p 0.9"), (["--top_k", "5"], "top_k 5"), (["--min_p", "0.1"], "min_p 0.1"),
    (["--repetition_penalty", "1.1"], "repetition_penalty"), (["--temperature", "0"], "temperature 0"),
    (["--use_vllm", "true", "--vllm_mode", "colocate"], "colocate"),
    (["--max_completion_length", "10"], "max_completion_length 10"),
    (["--lora_r", "8"], "lora_r set, but"),
])
def test_settings_the_rollouts_cannot_honour_are_refused(override, message, adapter_dir, box_dataset_dir,
                                                         tmp_path) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer(adapter_dir, box_dataset_dir, tmp_path, *override)


def test_with_vllm_every_request_names_the_grammar_the_server_builds(box_dataset_dir, processor) -> None:
    from trl import GRPOConfig

    from bbox_sft.grammar.spec import GrammarSpec
    from bbox_sft.grpo import check_rollouts

    args = GRPOConfig(output_dir="unused", use_vllm=True, vllm_mode="server", use_cpu=True, bf16=False,
                      generation_kwargs={"seed": 3})
    train = datasets.load_from_disk(str(box_dataset_dir))["train"]
    check_rollouts(get_task("subject"), "qwen", None, None, train, processor, args)
    assert args.generation_kwargs["seed"] == 3
    assert GrammarSpec.from_args(args.generation_kwargs["extra_args"]) == get_task("subject").grammar_spec("qwen")
    phrase = datasets.Dataset.from_dict({"query": ["cat", "dog"], "labels": [["cat"], ["dog"]]})
    with pytest.raises(ValueError, match="differs between rows"):
        check_rollouts(get_task("phrase"), "json", ["cat", "dog"], 2, phrase, processor, args)


# --- a run, end to end --------------------------------------------------------------------------------------------

def test_a_short_grpo_run_trains_the_sft_adapter_and_eval_predict_serve_load_it(adapter_dir, box_dataset_dir,
                                                                               tmp_path) -> None:
    out = tmp_path / "grpo"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               str(REPO / "bbox_sft" / "grpo.py"), RECIPE, "--model_name_or_path", str(adapter_dir),
               "--dataset_name", str(box_dataset_dir), "--output_dir", str(out), "--max_steps", "6",
               "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--box_eval_samples", "8",
               "--disable_tqdm", "true", "--reward_bonus", "0.5"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run = json.loads((out / "bbox_sft_args.json").read_text())
    assert run["method"] == "grpo" and run["started_from"] == str(adapter_dir)
    assert run["reward"] == "subject_iou + 0.5 per hit (IoU >= 0.5)"
    assert run["task"] == "subject" and run["image_max_side"] == 160  # the SFT run's, as it was trained
    sft = json.loads((adapter_dir / "adapter_config.json").read_text())
    grpo = json.loads((out / "adapter_config.json").read_text())
    assert (grpo["r"], grpo["base_model_name_or_path"]) == (sft["r"], sft["base_model_name_or_path"])
    card = (out / "README.md").read_text()
    assert "GRPO (TRL's GRPOTrainer) of the SFT adapter" in card and "- grpo" in card
    assert (out / "training_curves.png").stat().st_size > 10_000
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in logs if "reward" in e]
    assert len(steps) == 6 and all(e["completions/parse_rate"] == 1.0 for e in steps)
    assert all(0 <= e["frac_reward_zero_std"] <= 1 and e["reward_std"] >= 0 for e in steps)
    assert [e["step"] for e in logs if "eval_mean_iou" in e] == [3, 6]
    assert "test_mean_iou" in json.loads((out / "all_results.json").read_text())
    trained, started = (load_file(folder / "adapter_model.safetensors") for folder in (out, adapter_dir))
    assert trained.keys() == started.keys() and any(not torch.equal(trained[k], started[k]) for k in trained)

    from bbox_sft.evaluation import EvalArguments, evaluate_adapter
    from bbox_sft.predict import BoxPredictor
    from bbox_sft.serving import ServeArguments, VllmPlatform, prepare

    rows = evaluate_adapter(EvalArguments(adapter=str(out), dataset=[str(box_dataset_dir)],
                                          output_dir=str(tmp_path / "e"), limit=4))
    assert rows["adapter"]["parse_rate"] == 1.0 and not math.isnan(rows["adapter"]["mean_iou"])
    image = datasets.load_from_disk(str(box_dataset_dir))["test"][0]["image"]
    assert BoxPredictor.from_pretrained(out).predict([image])[0].box is not None
    command, _, said = prepare(ServeArguments(adapter=[str(adapter_dir), str(out)]), VllmPlatform("cpu", "v1"))
    assert f"grpo={out.resolve()}" in command and any("served as a vLLM LoRA module named grpo" in s for s in said)


GRPO_DDP_ON_CPU = """
import hashlib, json, sys
from pathlib import Path
import torch, torch.distributed as dist
import bbox_sft.grpo as grpo
from bbox_sft.grpo_trainer import BoxGRPOTrainer

out, steps, rewards = Path(sys.argv[1]), [], []
score, make_reward = BoxGRPOTrainer._generate_and_score_completions, grpo.reward_function

def reward_function(task, bonus=0.0):  # each rank's own rewards, before TRL gathers them
    inner = make_reward(task, bonus)
    def reward(*args, **kwargs):
        rewards.append(inner(*args, **kwargs))
        return rewards[-1]
    reward.__name__ = inner.__name__
    return reward

def probe(self, inputs):  # what each rank samples and the advantages it trains on, seen from inside the run
    output = score(self, inputs)
    mask = output["completion_mask"].bool()
    steps.append({"world": dist.get_world_size(), "rank": dist.get_rank(), "step": self.state.global_step,
                  "images": [hashlib.md5(row["image"].tobytes()).hexdigest() for row in inputs],
                  "completions": [ids[m].tolist() for ids, m in zip(output["completion_ids"], mask)],
                  "rewards": rewards[-1], "advantages": output["advantages"].tolist()})
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(steps))
    return output

grpo.reward_function, BoxGRPOTrainer._generate_and_score_completions = reward_function, probe
trainer = grpo.main(*grpo.parse_args(sys.argv[2:]))
torch.save({n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad},
           out / f"weights{dist.get_rank()}.pt")
"""


def test_two_rank_grpo_shares_each_group_across_ranks_and_validates_like_one_process(adapter_dir, box_dataset_dir,
                                                                                     tmp_path) -> None:
    """GRPO under the shipped DDP config on 2 CPU processes, 2 rows a rank and groups of 4: each group spans both
    ranks, each rank samples its own rollouts, the advantages are normalised over the whole gathered group, the
    ranks stay in step, and the validation equals the saved adapter's answers in one process."""
    from test_training import _single_process_answers

    out, probes = tmp_path / "ddp", tmp_path / "probes"
    probes.mkdir()
    script = tmp_path / "grpo_ddp.py"
    script.write_text(GRPO_DDP_ON_CPU)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "multi_gpu.yaml"), "--num_processes", "2", str(script),
               str(probes), RECIPE, "--model_name_or_path", str(adapter_dir), "--dataset_name", str(box_dataset_dir),
               "--output_dir", str(out), "--use_cpu", "true", "--max_steps", "2", "--per_device_train_batch_size",
               "2", "--num_generations", "4", "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "2",
               "--box_eval_samples", "5", "--per_device_eval_batch_size", "1", "--load_best_model_at_end", "false",
               "--calibrate_confidence", "false", "--do_eval", "false", "--disable_tqdm", "true"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((probes / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    logged = {e["step"]: e["reward"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "reward" in e}
    assert len(ranks[0]) == len(ranks[1]) == 2  # both steps' rollouts, on each rank
    for step, (mine, theirs) in enumerate(zip(*ranks)):
        assert [(r["world"], r["rank"], r["step"]) for r in (mine, theirs)] == [(2, 0, step), (2, 1, step)]
        assert len(set(mine["images"] + theirs["images"])) == 1  # one prompt's group of 4, 2 rollouts on each rank
        assert mine["completions"] != theirs["completions"]  # each rank samples its own
        rewards = torch.tensor(mine["rewards"] + theirs["rewards"], dtype=torch.float64)
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # over the whole group, both ranks
        assert mine["advantages"] + theirs["advantages"] == pytest.approx(expected.tolist(), abs=1e-4)
        assert logged[step + 1] == pytest.approx(rewards.mean().item(), abs=1e-6)  # the log: the whole batch's mean
    weights = [torch.load(probes / f"weights{rank}.pt") for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    started = load_file(adapter_dir / "adapter_model.safetensors")
    trained = load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(trained[k], started[k]) for k in trained)

    history = [json.loads(line) for line in (out / "validation" / "history.jsonl").read_text().splitlines()]
    [evaluation] = [h for h in history if h["split"] == "eval"]  # both ranks' shards, gathered, written once
    assert evaluation["answers"] == _single_process_answers(out, box_dataset_dir, 5)


def test_max_completion_length_may_equal_the_longest_answer_not_less(box_dataset_dir, processor) -> None:
    from trl import GRPOConfig

    from bbox_sft.grpo import check_rollouts

    task = get_task("objects")
    longest = task.token_budget(task.grammar(processor.tokenizer, "json", ["cat", "dog"], None, 3))
    train = datasets.load_from_disk(str(box_dataset_dir))["train"]
    check_rollouts(task, "json", ["cat", "dog"], 3, train, processor,
                   GRPOConfig(output_dir="unused", max_completion_length=longest, use_cpu=True, bf16=False))
    with pytest.raises(ValueError, match=f"max_completion_length {longest - 1} is shorter .* \\({longest} tokens\\)"):
        check_rollouts(task, "json", ["cat", "dog"], 3, train, processor,
                       GRPOConfig(output_dir="unused", max_completion_length=longest - 1, use_cpu=True, bf16=False))
