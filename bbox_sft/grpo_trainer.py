"""The GRPO trainer: TRL's ``GRPOTrainer`` with every rollout inside the answer grammar, the loss on the policy the
rollouts were sampled from, and the same generation-based validation as SFT (:mod:`bbox_sft.validation`).

What the grammar changes in reinforcement learning:

- **Rollouts.** Each completion is sampled at the recipe's temperature among the tokens the row's grammar allows
  (the same :class:`~bbox_sft.grammar.spec.GrammarSpec` as local decoding and serving: its labels, its query),
  the forced runs fed without a choice: every sampled answer is a valid, ordered box or list, its parse rate 1.0
  by construction (logged). On the transformers path :class:`~bbox_sft.decoding.ForcedTokenDecoder` samples (TRL's
  ``generate`` takes no logits processor here, and its ``generation_kwargs`` cannot carry one: this class
  overrides ``_generate_single_turn``, TRL's own extension point for a generation backend, because no hook takes a
  per-row grammar). With vLLM (server mode) each request names the grammar in ``extra_args`` and the server's
  logits processor applies it (``--logits-processors``).
- **The loss.** The sampling distribution is the policy renormalised over the allowed tokens, and TRL's loss
  uses full-vocabulary log-probabilities. Here the model's LM head is given a constrained path
  (:func:`constrain_lm_head`): the log-probability of each written token *among the tokens its grammar allowed
  there*, at the rollout's temperature. A forced token (the only one allowed) has log-probability 0 and no
  gradient; the importance ratio and the clipping compare the same distributions the sampler used; with vLLM,
  whose processed log-probabilities come after our mask, the sampler/trainer ratio TRL logs is the numerical gap
  alone.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Trainer
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx, pad

from .decoding import ForcedTokenDecoder
from .grammar import TokenGrammar
from .grammar.spec import GrammarSpec
from .tasks import Task
from .validation import GenerationValidation

logger = logging.getLogger(__name__)


def reward_function(task: Task, bonus: float = 0.0) -> Callable[..., list[float]]:
    """The task's reward (:meth:`~bbox_sft.tasks.base.Task.reward`) as TRL calls reward functions: the completions,
    and every dataset column by name (the truth is read from them as the task reads a record)."""

    def reward(completions: Sequence[Any], **columns: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        records = [{k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(texts)}
                   for i in range(len(texts))]
        return task.reward([task.parse(t) for t in texts], [task.target(r) for r in records], bonus)

    reward.__name__ = f"{task.name}_{'iou' if not task.answers_list else 'matched_iou'}"
    return reward


def constrain_lm_head(model, trainer: BoxGRPOTrainer) -> None:
    """Give ``model`` (the transformers model, under PEFT and TRL's fused head) a constrained LM-head path: while
    ``trainer`` holds the allowed tokens of the rows being scored, ``model(..., fused_lm_head=True)`` returns each
    completion token's log-probability among the tokens allowed at its step, and the entropy there, as TRL's fused
    head returns full-vocabulary ones. Otherwise the forward is unchanged."""
    fused = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        allowed = trainer.take_rows(labels.size(0)) if fused_lm_head and labels is not None else None
        if allowed is None:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        kwargs.pop("shift_labels", None)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        steps = allowed.size(1)
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1][:, -steps:]
        targets = labels[:, 1:][:, -steps:]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # an FSDP2 shard: the whole head, once
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        # the head's rows of the tokens allowed anywhere in these rows (a few hundred at most): (batch, steps, U)
        # logits, each step's own allowed ones picked from them, never the whole vocabulary's
        tokens, where = torch.unique(allowed.clamp(min=0), return_inverse=True)
        with maybe_gather_lm_head_ctx(weight, bias):
            rows = weight[tokens].float()
            some = hidden.float() @ rows.T + (bias[tokens].float() if bias is not None else 0.0)
        logits = some.gather(-1, where)
        logits = (logits / trainer.temperature).masked_fill(allowed < 0, float("-inf"))
        written = (allowed == targets.unsqueeze(-1)) & (allowed >= 0)
        valid = (targets != -100) & written.any(-1)
        logps = logits.log_softmax(-1)
        safe = torch.where(allowed >= 0, logps, torch.zeros_like(logps))
        log_probs = torch.where(valid, (safe * written).sum(-1), torch.zeros_like(safe[..., 0]))
        entropy = torch.where(valid, -(safe.exp() * safe * (allowed >= 0)).sum(-1), torch.zeros_like(log_probs))
        loss = -log_probs.sum() / valid.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=valid)

    model.forward = types.MethodType(forward, model)


# GRPOConfig's sampling fields and their "off" values: the grammar's sampler draws from the whole renormalised
# distribution at the temperature, so any other value would be silently dropped on the transformers path.
UNUSED_SAMPLING = {"top_p": (1.0,), "top_k": (0, -1, None), "min_p": (None, 0.0), "repetition_penalty": (1.0,)}


def check_sampling(args) -> None:
    """Refuse, naming the field, what the grammar's rollouts cannot honour: vLLM's colocate mode (TRL builds that
    engine without logits processors, so the grammar cannot reach it) and, on the transformers path, truncated
    sampling (the sampler draws among all allowed tokens at the temperature)."""
    if args.use_vllm and args.vllm_mode != "server":
        raise ValueError(f"vllm_mode {args.vllm_mode!r}: TRL builds the colocated engine without custom logits "
                         "processors, so the answer grammar cannot reach it; use vllm_mode: server (the server started "
                         "with bbox-sft's processor, README) or the transformers path (use_vllm: false)")
    if not args.use_vllm:
        for name, off in UNUSED_SAMPLING.items():
            if getattr(args, name) not in off:
                raise ValueError(f"{name} {getattr(args, name)}: the grammar's sampler draws among every allowed "
                                 f"token at the temperature; leave {name} at {off[0]} (or sample with vLLM)")
    if args.temperature <= 0:
        raise ValueError(f"temperature {args.temperature}: GRPO needs sampled rollouts (temperature > 0)")


class BoxGRPOTrainer(GenerationValidation, GRPOTrainer):
    """``GRPOTrainer`` with rollouts inside the grammar, the loss on the constrained policy, and the SFT validation."""

    curve = ("reward", "mean reward", "reward_std")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_sampling(kwargs["args"])
        processor = kwargs.get("processing_class")
        if processor is not None and getattr(processor, "tokenizer", processor).padding_side != "left":
            # TRL left-pads the prompts it scores but pads their image-token types (mm_token_type_ids, which place
            # M-RoPE's image positions) on the processor's side: a right-padding processor (Qwen's default) puts
            # the images of shorter prompts in the wrong place in the loss's forward. TRL's own processor loading
            # asks for left padding; a processor passed in must be so too (trl#5785).
            getattr(processor, "tokenizer", processor).padding_side = "left"
        super().__init__(*args, **kwargs)
        self._grammars: dict[GrammarSpec, TokenGrammar] = {}
        self._row_grammars: list[TokenGrammar] = []
        self._allowed: torch.Tensor | None = None  # the rows being scored: their allowed tokens, step by step
        self._cursor = 0
        self.sampler_logps: list[dict[int, float]] = []  # the last rollouts': each choice's log-probability
        inner = self.accelerator.unwrap_model(self.model)
        constrain_lm_head(inner.get_base_model() if hasattr(inner, "get_base_model") else inner, self)
        if self.ref_model is not None:
            constrain_lm_head(self.ref_model, self)

    # --- the grammar of each row -------------------------------------------------------------------

    def row_grammar(self, row: dict[str, Any]) -> TokenGrammar:
        spec = self.task.grammar_spec(self.answer_format, self.labels, self.task.query(row), self.max_objects)
        if spec not in self._grammars:
            self._grammars[spec] = spec.build(self.processing_class.tokenizer)
        return self._grammars[spec]

    def allowed_steps(self, completions: Sequence[Sequence[int]]) -> torch.Tensor:
        """(rows, steps, most allowed) token ids allowed before each completion token, -1 where there are none;
        as many steps as TRL pads the completions to. A token its grammar did not allow is a bug, said here."""
        steps = [[grammar.allowed(ids[:t]) for t in range(len(ids))]
                 for grammar, ids in zip(self._row_grammars, completions)]
        for row, (ids, allowed) in enumerate(zip(completions, steps)):
            stray = next((t for t, token in enumerate(ids) if token not in allowed[t]), None)
            if stray is not None:
                raise RuntimeError(f"rollout {row} left its grammar at step {stray}: {list(ids)}")
        length = max(map(len, completions), default=0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        width = max((len(a) for s in steps for a in s), default=1)
        table = torch.full((len(completions), length, width), -1, dtype=torch.long)
        for row, allowed in enumerate(steps):
            for t, tokens in enumerate(allowed):
                table[row, t, : len(tokens)] = torch.tensor(tokens)
        return table.to(self.accelerator.device)

    def take_rows(self, n: int) -> torch.Tensor | None:
        """The allowed tokens of the next ``n`` rows TRL scores (it scores a batch in order, in chunks)."""
        if self._allowed is None:
            return None
        rows = self._allowed[self._cursor:self._cursor + n]
        self._cursor += n
        return rows

    @contextmanager
    def _constrained(self, allowed: torch.Tensor | None):
        before = self._allowed
        self._allowed = allowed
        try:
            yield
        finally:
            self._allowed = before

    # --- TRL's steps, with the grammar -------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        self._row_grammars = [self.row_grammar(row) for row in inputs]
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            allowed, self._allowed = self._allowed, None
        if allowed.size(1) != output["completion_ids"].size(1):
            raise RuntimeError(f"allowed tokens for {allowed.size(1)} steps, completions of "
                               f"{output['completion_ids'].size(1)}")
        output["allowed"] = allowed
        # the loss counts the policy's decisions only: a forced token (one allowed) has log-probability 0 and no
        # gradient, and would only dilute the token mean (TRL's tool_mask, its way to keep tokens out of the loss)
        decisions = (allowed[..., 1] >= 0).int()
        output["tool_mask"] = decisions
        output["num_items_in_batch"] = self.accelerator.gather((output["completion_mask"] * decisions).sum()).sum()
        mode = "train" if self.model.training else "eval"
        texts = self.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
        self._metrics[mode]["completions/parse_rate"].append(
            sum(self.task.parse(t) is not None for t in texts) / max(len(texts), 1))
        return output

    def _generate(self, prompts):
        generated = super()._generate(prompts)
        # from here on in this batch (the old and reference log-probs TRL computes next) scores are constrained
        self._allowed = self.allowed_steps(generated[1])
        return generated

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """No sampled rollouts on the validation split: it is scored by the greedy, constrained answers of
        :class:`~bbox_sft.validation.GenerationValidation`, as in SFT (rollouts would cost num_generations times
        as much, for a figure no report uses)."""
        return None, None, None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        self._cursor = 0
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _compute_loss(self, model, inputs):
        with self._constrained(inputs["allowed"]):
            return super()._compute_loss(model, inputs)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm:  # the server applies the grammar named in each request's extra_args
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        batch = {"input_ids": pad([torch.tensor(ids) for ids in prompt_ids], padding_value=self._tokenizer.pad_token_id,
                                  padding_side="left"),
                 "attention_mask": pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], padding_value=0,
                                       padding_side="left")}
        for key, value in multimodal_fields.items():
            if isinstance(value, torch.Tensor):
                batch[key] = value
            elif isinstance(value, list) and value and isinstance(value[0], list):  # per token: left-padded too
                batch[key] = pad([torch.tensor(x) for x in value], padding_value=0, padding_side="left")
        batch = Trainer._prepare_inputs(self, batch)  # onto the device (GRPOTrainer's own builds rollouts)
        generator = torch.Generator().manual_seed(self.args.seed * 100_003 + self.state.global_step * 101
                                                  + self.accelerator.process_index)
        budget = max(self.task.token_budget(grammar) for grammar in self._row_grammars)
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                         gradient_checkpointing_kwargs=self.args.activation_checkpointing_kwargs
                                         ) as model, torch.no_grad(), \
                self._dist.summon_full_params(self.model_wrapped, recurse=False):
            was_training = model.training
            model.eval()
            decoder = ForcedTokenDecoder(model, list(self._row_grammars), self._tokenizer.pad_token_id,
                                         max_new_tokens=min(budget, self.args.max_completion_length),
                                         synced_gpus=self.is_fsdp_enabled or self.is_deepspeed_enabled,
                                         temperature=self.temperature, generator=generator)
            written, _, _ = decoder.decode(batch)
            model.train(was_training)
        self.sampler_logps = decoder.sampled_logps
        return written, None
