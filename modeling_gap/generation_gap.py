"""Latent-aware generation for GAP models.

`GapGenerationMixin.generate` is transformers' `generate` (same arguments, same `GenerationConfig`, same logits
processors, stopping criteria and streamer) with one change in the decoding loop: a row that emits
`<|latent_start|>` receives, for the next K steps, the latent head's output (computed from its last hidden state) as
its input embedding instead of a token embedding; then `<|latent_end|>` is forced and text resumes. Rows in text and
in latent mode share one forward per step over the KV cache, with explicit 3-D M-RoPE positions (each latent takes
the next text position).
"""

from dataclasses import dataclass

from .transformers_compat import cache_kwargs, output_cache  # first: the supported-version check

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import CompileConfig
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .configuration_gap import LATENT_FEEDBACK_MODES, LATENT_INTERVENTIONS


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
        if latent_feedback is not None and latent_feedback not in LATENT_FEEDBACK_MODES:
            raise ValueError(f"latent_feedback must be None or one of {LATENT_FEEDBACK_MODES}; got {latent_feedback!r}.")
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
        raise NotImplementedError(
            "GAP generate supports greedy search and sampling (num_beams=1): beams would each need their own latent "
            "state. Pass num_beams=1."
        )

    def _assisted_decoding(self, input_ids, logits_processor, *args, **kwargs):
        """Assisted and prompt-lookup decoding verify drafted *tokens*, which cannot carry latents: they run only when
        no span can open in this call (`latent_intervention="drop"` or `max_latent_spans=0`), and are then stock."""
        options = self._latent_generation_options or {}
        start_id = self.config.latent_start_token_id
        can_open = start_id is not None and options.get("intervention") != "drop" and options.get("max_spans") != 0
        if can_open:
            raise ValueError(
                "Assisted and prompt-lookup decoding are not latent-aware: drafted tokens cannot carry the continuous "
                "latents a GAP span feeds, so the result would silently differ from GAP generate. Generate without "
                "`assistant_model` / `prompt_lookup_num_tokens`, or pass `latent_intervention='drop'` (or "
                "`max_latent_spans=0`) to decode without latent spans."
            )
        if start_id is not None:
            logits_processor.append(SuppressTokensLogitsProcessor([start_id], device=input_ids.device))
        return super()._assisted_decoding(input_ids, logits_processor, *args, **kwargs)

    # ---- one decoding step, shared by every row and every mode ----------------------------------------------
    def next_input_embeddings(
        self,
        tokens: torch.LongTensor,
        latent_mode: torch.BoolTensor | None,
        previous_hidden: torch.Tensor,
        feedback: str,
        intervention: str | None = None,
        intervention_noise: torch.Tensor | None = None,
        intervention_permutation: torch.LongTensor | None = None,
    ):
        """What each row is fed next: `(embeddings (B, d), latents (B, d) or None)`.

        Rows with `latent_mode` (B,) get the latent head's output on `previous_hidden` (B, d), after the
        intervention; the others the embedding of `tokens` (B,). `latent_mode=None` (no row in latent mode, eager
        paths only) skips the head. Mode switches are data, not control flow.
        """
        token_embeddings = self.get_input_embeddings()(tokens)
        if latent_mode is None:
            return token_embeddings, None
        latents = self.latent_head(previous_hidden, feedback)
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
        return embeds, latents

    def latent_step(
        self,
        tokens: torch.LongTensor,
        latent_mode: torch.BoolTensor | None,
        previous_hidden: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        cache,
        feedback: str,
        intervention: str | None = None,
        intervention_noise: torch.Tensor | None = None,
        intervention_permutation: torch.LongTensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """Feed one element per row over the KV cache: `(logits (B, V) fp32, hidden (B, d), fed latents (B, d) or
        None, per-layer hidden states or None, per-layer attentions or None)`.

        `position_ids` is (3, B, 1), `attention_mask` (B, total_length), `cache` the KV cache; the inputs are as in
        [`next_input_embeddings`]. This is the function the static-cache path compiles.
        """
        embeds, latents = self.next_input_embeddings(
            tokens, latent_mode, previous_hidden, feedback, intervention, intervention_noise, intervention_permutation
        )
        outputs = self.model.language_model(
            inputs_embeds=embeds[:, None], attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, **cache_kwargs(cache),
        )
        # A fresh (B, d) tensor: its strides are the same at every batch size and step (no recompilation).
        hidden = outputs.last_hidden_state[:, -1].clone(memory_format=torch.contiguous_format)
        return self.lm_head(hidden).float(), hidden, latents, outputs.hidden_states, outputs.attentions

    # ---- the decoding loop (transformers' `_sample`, latent-aware) ------------------------------------------
    def _latent_step_function(self, cache, generation_config):
        """`latent_step`, compiled with `torch.compile` when the cache is static and compilation applies (an
        accelerator, or an explicit `compile_config` on any device; never with `disable_compile`)."""
        compileable = cache is not None and getattr(cache, "is_compileable", False) and type(cache) is not DynamicCache
        wanted = self.device.type != "cpu" or generation_config.compile_config is not None
        if getattr(self, "hf_quantizer", None) is not None:
            wanted = wanted and self.hf_quantizer.is_compileable
        if not (compileable and wanted) or generation_config.disable_compile:
            return self.latent_step, False
        compile_config = generation_config.compile_config or CompileConfig(fullgraph=True)
        if getattr(self, "_latent_step_compile_config", None) != compile_config:
            self._latent_step_compile_config = compile_config
            self._compiled_latent_step = torch.compile(self.latent_step, **compile_config.to_dict())
        return self._compiled_latent_step, True

    def _uncached_step(self, input_ids, fed_embeddings, positions, attention_mask, prompt, output_hidden_states,
                       output_attentions):
        """`use_cache=False`: the whole sequence again, as stock does, with every fed latent at its slot.

        `fed_embeddings` (B, n, d) are the generated elements' input embeddings (tokens or latents), `positions`
        (4, B, L) and `attention_mask` (B, L) cover prompt and generated elements; `prompt` holds the prompt's
        input embeddings (embedded once) and its image features, reused (stock re-encodes the same pixels).
        """
        prompt_embeds = prompt["inputs_embeds"]
        ids, image_outputs = (None, None) if prompt["length"] == 0 else (input_ids, prompt["image_outputs"])
        embeds = torch.cat([prompt_embeds, fed_embeddings.to(prompt_embeds.dtype)], dim=1)
        outputs = self.model(
            input_ids=ids, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
            mm_encoder_outputs={"image": image_outputs} if image_outputs is not None else None,
            mm_token_type_ids=prompt["mm_token_type_ids"], use_cache=False,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        hidden = outputs.last_hidden_state[:, -1].clone(memory_format=torch.contiguous_format)
        return self.lm_head(hidden).float(), hidden, outputs.hidden_states, outputs.attentions

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
        batch_size, prompt_length = input_ids.shape  # prompt_length is 0 for a prompt given as `inputs_embeds`
        pad_token = generation_config._pad_token_tensor
        has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        return_dict = generation_config.return_dict_in_generate
        use_cache = model_kwargs.get("use_cache", True)
        scores = () if return_dict and generation_config.output_scores else None
        raw_logits = () if return_dict and generation_config.output_logits else None
        output_attentions = bool(return_dict and generation_config.output_attentions)
        output_hidden_states = bool(return_dict and generation_config.output_hidden_states)
        attentions = () if output_attentions else None
        hidden_states = () if output_hidden_states else None

        prompt_embeds = model_kwargs.get("inputs_embeds") if not generation_config.is_assistant else None
        context_length = prompt_embeds.shape[1] if prompt_embeds is not None and prompt_length == 0 else prompt_length
        prompt_mask = model_kwargs.get("attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones(batch_size, context_length, dtype=torch.long, device=device)
        positions = model_kwargs["position_ids"]  # (4, B, L): the text axis and the three M-RoPE axes
        last_position = positions[-3:, :, -1:]  # (3, B, 1) rope axes of the last prompt element

        model_kwargs["logits_to_keep"] = 1
        outputs = self._prefill(input_ids, generation_config, model_kwargs,
                                is_first_iteration=not generation_config.is_assistant)
        cache = output_cache(outputs) if use_cache else None
        logits = outputs.logits[:, -1].float()
        hidden = outputs.last_hidden_state[:, -1].clone(memory_format=torch.contiguous_format)
        step_hidden_states, step_attentions = outputs.hidden_states, outputs.attentions
        if feedback == "ema_norm" and float(self.latent_head.ema_norm) == 0 and outputs.image_outputs is not None:
            # Training-free calibration when the buffer was never set: the prompt's own visual input embeddings.
            self.latent_head.update_ema_norm(
                torch.cat(outputs.image_outputs.pooler_output), self.config.latent_ema_momentum
            )
        prompt = None
        if not use_cache:  # what every uncached step feeds again: embedded once
            if prompt_length:
                prompt_embeds = self.get_input_embeddings()(input_ids)
            prompt = dict(
                length=prompt_length, inputs_embeds=prompt_embeds, image_outputs=outputs.image_outputs,
                mm_token_type_ids=model_kwargs.get("mm_token_type_ids"),
            )
        del outputs

        step_function, compiled = self._latent_step_function(cache, generation_config)
        static = getattr(cache, "is_compileable", False) and type(cache) is not DynamicCache
        if static:
            # One mask of fixed shape for every step: causality hides the slots not written yet.
            max_cache_length = cache.get_max_length()
            attention_mask = torch.cat(
                [prompt_mask, prompt_mask.new_ones(batch_size, max_cache_length - prompt_mask.shape[1])], dim=-1
            )
        else:
            attention_mask = prompt_mask
        fed_embeddings = []  # use_cache=False: every generated element's input embedding, in order

        generator = torch.Generator(device=device).manual_seed(options["seed"])
        permutation = None
        if intervention == "shuffle":
            permutation = torch.randperm(hidden.shape[-1], generator=generator, device=device)

        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        last_token = input_ids[:, -1] if prompt_length else torch.full((batch_size,), -1, device=device)
        slots_left = torch.where(last_token == start_id, k, 0).to(device)  # a prompt may end in latent mode
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
            if hidden_states is not None:
                hidden_states += (step_hidden_states,)
            if attentions is not None:
                attentions += (step_attentions,)
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
            if use_cache:
                logits, hidden, fed, step_hidden_states, step_attentions = step_function(
                    next_tokens, mode, hidden, last_position, attention_mask, cache, feedback,
                    intervention, noise, permutation, output_hidden_states, output_attentions,
                )
                if compiled:  # CUDA-graph outputs are overwritten by the next replay: keep copies
                    logits, hidden, fed = logits.clone(), hidden.clone(), fed.clone()
            else:
                embeds, fed = self.next_input_embeddings(
                    next_tokens, mode, hidden, feedback, intervention, noise, permutation
                )
                fed_embeddings.append(embeds)
                positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
                logits, hidden, step_hidden_states, step_attentions = self._uncached_step(
                    input_ids, torch.stack(fed_embeddings, dim=1), positions, attention_mask, prompt,
                    output_hidden_states, output_attentions,
                )
            if fed is not None:
                latent_records.append((append_slot, fed))

        # Steps taken after every row had finished (seen late) only appended padding: drop them.
        done = (~torch.stack(any_unfinished)).nonzero()
        if len(done):
            keep = int(done[0]) + 1
            input_ids = input_ids[:, : prompt_length + keep]
            scores = scores[:keep] if scores is not None else None
            raw_logits = raw_logits[:keep] if raw_logits is not None else None
            hidden_states = hidden_states[:keep] if hidden_states is not None else None
            attentions = attentions[:keep] if attentions is not None else None

        if streamer is not None:
            streamer.end()
        if not return_dict:
            return input_ids
        return GapGenerateOutput(
            sequences=input_ids,
            scores=scores,
            logits=raw_logits,
            attentions=attentions,
            hidden_states=hidden_states,
            **cache_kwargs(cache),
            latents=self._collect_latents(latent_records, input_ids[:, max(prompt_length - 1, 0) :], k),
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
