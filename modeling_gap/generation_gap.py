"""Latent-aware generation for GAP models.

`GapGenerationMixin.generate` is transformers' `generate` (same arguments, same `GenerationConfig`, same logits
processors, stopping criteria and streamer) with one change in the decoding loop: a row that emits
`<|latent_start|>` receives, for the next K steps, the latent head's output (computed from its last hidden state) as
its input embedding instead of a token embedding; then `<|latent_end|>` is forced and text resumes. Rows in text and
in latent mode share one forward per step over the KV cache, with explicit 3-D M-RoPE positions (each latent takes
the next text position).
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import CompileConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

LATENT_INTERVENTIONS = (None, "zero", "noise", "shuffle", "mean", "drop")


@dataclass
class GapGenerateOutput(GenerateDecoderOnlyOutput):
    """
    [`GenerateDecoderOnlyOutput`] plus the latents that were fed back.

    Args:
        latents (`list[torch.FloatTensor]`, one per row):
            Row i's latents, of shape `(num_spans_i, K, hidden_size)`: what was fed at each latent slot, after any
            `latent_intervention`, spans in order. Only closed spans (with their end token) count; under the
            `"sampled_end"` rule K is the span maximum and a shorter span is zero-padded (its length is the number
            of slot tokens in `sequences`).
    """

    latents: list[torch.FloatTensor] | None = None


class GapGenerationMixin:
    """Adds latent reasoning to `generate`. Extra keyword arguments of `generate`:

    - `latent_feedback` (`"pca" | "ema_norm" | "raw"`): override `config.latent_feedback` for this call.
    - `latent_intervention` (`None | "zero" | "noise" | "shuffle" | "mean" | "drop"`), for probing: `zero` feeds
      zeros; `noise` feeds Gaussian noise rescaled to each latent's norm; `shuffle` permutes the coordinates of every
      latent by one fixed random permutation; `mean` feeds the mean visual input embedding (`latent_head.pca_mean`);
      `drop` never opens a span (`<|latent_start|>` is suppressed), so the answer is produced without latents.
    - `latent_intervention_seed` (`int`, default 0): seeds `noise` and `shuffle`.
    - `max_latent_spans` (`int`): after this many spans a row can no longer open one.
    - `return_latents` (`bool`): return a [`GapGenerateOutput`] (as `return_dict_in_generate=True` does) whose
      `latents` hold what was fed.
    - `latent_targets`: vectors for complete latent spans already in the prompt (e.g. a previous output's latents).

    Greedy search and sampling are supported (`num_beams=1`).
    """

    _latent_generation_options: dict | None = None

    def generate(
        self,
        *args,
        latent_feedback: str | None = None,
        latent_intervention: str | None = None,
        latent_intervention_seed: int = 0,
        max_latent_spans: int | None = None,
        return_latents: bool = False,
        **kwargs,
    ):
        if latent_feedback not in (None, "pca", "ema_norm", "raw"):
            raise ValueError(f"latent_feedback must be None, 'pca', 'ema_norm' or 'raw'; got {latent_feedback!r}.")
        if latent_intervention not in LATENT_INTERVENTIONS:
            raise ValueError(f"latent_intervention must be one of {LATENT_INTERVENTIONS}; got {latent_intervention!r}.")
        if max_latent_spans is not None and (not isinstance(max_latent_spans, int) or max_latent_spans < 0):
            raise ValueError(f"max_latent_spans must be None or an integer >= 0; got {max_latent_spans!r}.")
        if return_latents:
            kwargs["return_dict_in_generate"] = True
        self._latent_generation_options = dict(
            feedback=latent_feedback or self.config.latent_feedback,
            intervention=latent_intervention,
            seed=latent_intervention_seed,
            max_spans=max_latent_spans,
        )
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._latent_generation_options = None

    def _beam_search(self, *args, **kwargs):
        raise NotImplementedError("GAP generate supports greedy search and sampling (num_beams=1).")

    # ---- one decoding step, shared by every row and every mode ----------------------------------------------
    def latent_step(
        self,
        tokens: torch.LongTensor,
        latent_mode: torch.BoolTensor,
        previous_hidden: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        cache,
        feedback: str,
        intervention: str | None = None,
        intervention_noise: torch.Tensor | None = None,
        intervention_permutation: torch.LongTensor | None = None,
    ):
        """Feed one element per row and return `(logits (B, V) fp32, hidden (B, d), fed_latents (B, d))`.

        Rows with `latent_mode` (None: no row) get the latent head's output on `previous_hidden` (B, d) as input embedding (after
        the intervention), the others the embedding of `tokens` (B,). `position_ids` is (3, B, 1), `attention_mask`
        (B, total_length), `cache` the KV cache. Mode switches are data, not control flow.
        """
        token_embeddings = self.get_input_embeddings()(tokens)
        if latent_mode is None:  # no row in latent mode (eager paths only): skip the head
            return self._decode(token_embeddings, position_ids, attention_mask, cache) + (None,)
        latents = self.latent_head(previous_hidden, feedback=feedback)
        if intervention == "zero":
            latents = torch.zeros_like(latents)
        elif intervention == "noise":
            noise = intervention_noise.to(latents.dtype)
            latents = noise * (latents.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        elif intervention == "shuffle":
            latents = latents[:, intervention_permutation]
        elif intervention == "mean":
            latents = self.latent_head.pca_mean.to(latents.dtype).expand_as(latents)
        embeds = torch.where(latent_mode[:, None], latents.to(token_embeddings.dtype), token_embeddings)
        return self._decode(embeds, position_ids, attention_mask, cache) + (latents,)

    def _decode(self, embeds, position_ids, attention_mask, cache):
        """(B, d) input embeddings -> (logits (B, V) fp32, final hidden state (B, d)), one position over the cache."""
        outputs = self.model.language_model(
            inputs_embeds=embeds[:, None], attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=True,
        )
        hidden = outputs.last_hidden_state[:, -1]
        return self.lm_head(hidden).float(), hidden

    # ---- the decoding loop (transformers' `_sample`, latent-aware) ------------------------------------------
    def _latent_step_function(self, cache, generation_config):
        """`latent_step`, compiled with `torch.compile` when the cache is static and compilation applies (an
        accelerator, or an explicit `compile_config` on any device; never with `disable_compile`)."""
        compileable = cache is not None and getattr(cache, "is_compileable", False) and type(cache) is not DynamicCache
        wanted = self.device.type != "cpu" or generation_config.compile_config is not None
        if not (compileable and wanted) or generation_config.disable_compile:
            return self.latent_step, False
        compile_config = generation_config.compile_config or CompileConfig(fullgraph=True)
        if getattr(self, "_latent_step_compile_config", None) != compile_config:
            self._latent_step_compile_config = compile_config
            self._compiled_latent_step = torch.compile(self.latent_step, **compile_config.to_dict())
        return self._compiled_latent_step, True

    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        options = self._latent_generation_options or dict(
            feedback=self.config.latent_feedback, intervention=None, seed=0, max_spans=None
        )
        feedback, intervention = options["feedback"], options["intervention"]
        pad_id, start_id, end_id = self.config.latent_token_ids
        if start_id is None:
            raise ValueError("config.latent_start_token_id is not set: this model cannot open latent spans.")
        k = self.config.max_latents_per_span
        sampled_end = self.config.latent_span_rule == "sampled_end"
        device = input_ids.device
        batch_size, prompt_length = input_ids.shape
        pad_token = generation_config._pad_token_tensor
        has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        return_dict = generation_config.return_dict_in_generate
        scores = () if return_dict and generation_config.output_scores else None
        raw_logits = () if return_dict and generation_config.output_logits else None

        prompt_mask = model_kwargs.get("attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones_like(input_ids)
        last_position = model_kwargs["position_ids"][-3:, :, -1:]  # (3, B, 1) rope axes of the last prompt element

        model_kwargs["logits_to_keep"] = 1
        outputs = self._prefill(input_ids, generation_config, model_kwargs)
        cache = outputs.cache
        logits = outputs.logits[:, -1].float()
        hidden = outputs.last_hidden_state[:, -1].contiguous()  # the same strides as every later step
        if feedback == "ema_norm" and float(self.latent_head.ema_norm) == 0 and outputs.image_outputs is not None:
            # Training-free calibration when the buffer was never set: the prompt's own visual input embeddings.
            self.latent_head.update_ema_norm(torch.cat(outputs.image_outputs.pooler_output))
        del outputs

        step_function, compiled = self._latent_step_function(cache, generation_config)
        static = getattr(cache, "is_compileable", False) and type(cache) is not DynamicCache
        if static:
            # One mask of fixed shape for every step: causality hides the slots not written yet.
            max_cache_length = cache.get_max_length()
            attention_mask = torch.cat(
                [prompt_mask, prompt_mask.new_ones(batch_size, max_cache_length - prompt_length)], dim=-1
            )
        else:
            attention_mask = prompt_mask

        generator = torch.Generator(device=device).manual_seed(options["seed"])
        permutation = None
        if intervention == "shuffle":
            permutation = torch.randperm(hidden.shape[-1], generator=generator, device=device)

        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        slots_left = torch.where(input_ids[:, -1] == start_id, k, 0).to(device)  # a prompt may end in latent mode
        end_due = torch.zeros(batch_size, dtype=torch.bool, device=device)
        spans_opened = (input_ids == start_id).sum(-1)
        latent_records = []  # (appended-a-slot mask (B,), fed latents (B, d)) per step
        # Reading a flag from the device waits for it: on accelerators, look only every few steps and trim after.
        check_every = 1 if device.type == "cpu" or streamer is not None else 4
        any_unfinished = []
        max_steps = generation_config.max_length - prompt_length

        for step in range(max_steps):
            if raw_logits is not None:
                raw_logits += (logits,)
            next_scores = logits_processor(input_ids, logits.clone() if raw_logits is not None else logits)
            # `drop` and `max_latent_spans` win over every logits processor: the span cannot open.
            if intervention == "drop":
                next_scores[:, start_id] = -float("inf")
            elif options["max_spans"] is not None:
                blocked = spans_opened >= options["max_spans"]
                next_scores[:, start_id] = next_scores[:, start_id].masked_fill(blocked, -float("inf"))
            if scores is not None:
                scores += (next_scores,)
            if generation_config.do_sample:
                sampled = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                sampled = next_scores.argmax(dim=-1)

            in_span = (slots_left > 0) & unfinished
            if sampled_end:  # the span ends as soon as the end token is chosen (or is forced after the maximum)
                ends_early = in_span & (sampled == end_id)
                append_slot = in_span & ~ends_early
                end_due = end_due | ends_early
            else:
                append_slot = in_span
            next_tokens = torch.where(append_slot, pad_id, torch.where(end_due, end_id, sampled))
            if has_eos_stopping_criteria:
                next_tokens = torch.where(unfinished, next_tokens, pad_token)
            opens = (next_tokens == start_id) & unfinished & ~append_slot
            end_due = append_slot & (slots_left == 1)
            slots_left = torch.where(append_slot, slots_left - 1, torch.where(opens, k, 0))
            if sampled_end:
                slots_left = torch.where(next_tokens == end_id, 0, slots_left)
            spans_opened = spans_opened + opens.long()

            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None and not bool(append_slot.any() or (next_tokens == end_id).any() or opens.any()):
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            any_unfinished.append(unfinished.any())
            if step == max_steps - 1 or ((step + 1) % check_every == 0 and not bool(any_unfinished[-1])):
                break

            if not static:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=-1)
            last_position = last_position + 1
            noise = None
            if intervention == "noise":
                noise = torch.randn(hidden.shape, generator=generator, device=device, dtype=torch.float32)
            if compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            # On the CPU a look at the mode flags is free: skip the head when no row is in latent mode.
            mode = append_slot if compiled or device.type != "cpu" or bool(append_slot.any()) else None
            logits, hidden, fed = step_function(
                next_tokens, mode, hidden, last_position, attention_mask, cache, feedback,
                intervention, noise, permutation,
            )
            if compiled:  # CUDA-graph outputs are overwritten by the next replay: keep copies
                logits, hidden, fed = logits.clone(), hidden.clone(), fed.clone()
            if fed is not None:
                latent_records.append((append_slot, fed))

        # Steps taken after every row had finished (seen late) only appended padding: drop them.
        done = (~torch.stack(any_unfinished)).nonzero()
        if len(done):
            keep = int(done[0]) + 1
            input_ids = input_ids[:, : prompt_length + keep]
            scores = scores[:keep] if scores is not None else None
            raw_logits = raw_logits[:keep] if raw_logits is not None else None

        if streamer is not None:
            streamer.end()
        if not return_dict:
            return input_ids
        return GapGenerateOutput(
            sequences=input_ids,
            scores=scores,
            logits=raw_logits,
            cache=cache,
            latents=self._collect_latents(latent_records, input_ids[:, prompt_length - 1 :], k),
        )

    def _collect_latents(self, records, generated: torch.LongTensor, k: int) -> list[torch.Tensor]:
        """Per row, the fed latents of each closed span as (num_spans, k, d), zero-padded past a short span's end.

        `generated` holds the last prompt token and the generated tokens: the latents were fed, in order, at its
        `<|latent_pad|>` slots (a slot appended last was never fed).
        """
        pad_id, start_id, end_id = self.config.latent_token_ids
        hidden_size = self.config.text_config.hidden_size
        if records:
            mask = torch.stack([m for m, _ in records], dim=1)  # (B, steps)
            fed = torch.stack([f for _, f in records], dim=1)  # (B, steps, d)
        latents = []
        for row, tokens in enumerate(generated.tolist()):
            row_latents = fed[row][mask[row]] if records else None
            spans, used, length, open_span = [], 0, 0, False
            for token in tokens:
                if token == start_id:
                    open_span, length = True, 0
                elif token == pad_id and open_span:
                    length += 1
                elif token == end_id and open_span:
                    span = row_latents[used : used + length]
                    spans.append(torch.cat([span, span.new_zeros(k - length, span.shape[-1])]))
                    used, open_span = used + length, False
            dtype = self.latent_head.proj.weight.dtype
            latents.append(torch.stack(spans) if spans else torch.zeros(0, k, hidden_size, dtype=dtype))
        return latents


__all__ = ["GapGenerateOutput", "GapGenerationMixin", "LATENT_INTERVENTIONS"]
