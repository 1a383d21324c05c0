"""A chat request's sampling, constraint and logprob options -> the engine protocol's `Sampling`, and the
engine's token logprobs -> OpenAI's `logprobs` shape (tokens by text, or by id with vLLM's
`return_tokens_as_token_ids`) and the prompt's -> vLLM's `prompt_logprobs` shape. The constraint is handed to
the engine as it is: the engine's structured-output backend compiles it (a schema that does not compile is a 400
naming the field)."""

from __future__ import annotations

from service.adapters.registry import Revision
from service.engine.base import Constraint, Sampling, TokenLogprob
from service.errors import BadRequest
from service.protocol.chat import ChatCompletionRequest, ChoiceLogprobs
from service.protocol.chat import TokenLogprob as WireTokenLogprob
from service.protocol.chat import TopLogprob as WireTopLogprob
from service.protocol.sampling import PromptLogprob, PromptLogprobs


def sampling_for(req: ChatCompletionRequest, max_tokens: int, vocab_size: int,
                 forced_tool_schema: dict | None = None) -> Sampling:
    """The engine's sampling for `req`; `forced_tool_schema` (a required or named tool_choice) constrains the
    output to the one call it allows."""
    logit_bias = {int(token): bias for token, bias in req.logit_bias.items()} if req.logit_bias else None
    logprobs, named = req.top_logprobs_wanted, req.logprob_token_ids
    if named:
        if logprobs is None:
            raise BadRequest("logprob_token_ids names the alternatives of logprobs: send logprobs too",
                             param="logprob_token_ids")
        if logprobs:
            raise BadRequest(f"logprob_token_ids names the alternatives in place of the {logprobs} most likely: "
                             "ask for no count of them beside it (top_logprobs on chat, logprobs: 0 on completions)",
                             param="logprob_token_ids")
        logprobs = len(named)
    for param, ids in (("logit_bias", logit_bias), ("stop_token_ids", req.stop_token_ids),
                       ("allowed_token_ids", req.allowed_token_ids), ("logprob_token_ids", named)):
        beyond = sorted({t for t in ids or () if t >= vocab_size})
        if beyond:
            raise BadRequest(f"{param} names token id(s) {beyond[:5]} outside the vocabulary (size {vocab_size})",
                             param=param)
    constraint = None
    if forced_tool_schema is not None:
        constraint = Constraint(kind="json", spec=forced_tool_schema, param="tool_choice")
    elif (found := req.constraint()) is not None:
        kind, spec, param = found
        constraint = Constraint(kind=kind, spec=spec, param=param)
    return Sampling(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, n=req.n, stop=req.stop, seed=req.seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, logprobs=logprobs, logprob_token_ids=named,
        logit_bias=logit_bias, constraint=constraint, stop_token_ids=req.stop_token_ids, bad_words=req.bad_words,
        allowed_token_ids=req.allowed_token_ids, skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, prompt_logprobs=req.prompt_logprobs,
    )


def token_text(text: str, token_id: int, as_ids: bool) -> str:
    """A token as logprobs name it: its text, or with vLLM's `return_tokens_as_token_ids` "token_id:N" (its
    bytes stay its text's)."""
    return f"token_id:{token_id}" if as_ids else text


def refuse_prompt_logprobs(revision: Revision | None, model: str, param: str) -> None:
    """The engine leaves an lm_head delta out of a prompt's logprobs (vllm_fixes, lora-prompt-logprobs): refuse
    them for an adapter that adapts lm_head rather than answer the base's."""
    if revision is not None and revision.meta is not None and revision.meta.adapts("lm_head"):
        raise BadRequest(f"{param} is not supported for adapter '{model}': it adapts lm_head, whose delta the "
                         "engine leaves out of a prompt's logprobs", param=param)


def wire_prompt_logprobs(tokens: list[TokenLogprob | None] | None, wanted: int) -> PromptLogprobs | None:
    """The engine's prompt logprobs in vLLM's `prompt_logprobs` shape: per position, the prompt's token and the
    `wanted` most likely ones by token id."""
    if tokens is None:
        return None
    out: PromptLogprobs = []
    for t in tokens:
        if t is None:
            out.append(None)
            continue
        position = {str(t.id): PromptLogprob(logprob=t.logprob, rank=t.rank, decoded_token=t.token)}
        for rank, alt in enumerate(t.top[:wanted], start=1):
            position.setdefault(str(alt.id), PromptLogprob(logprob=alt.logprob, rank=rank, decoded_token=alt.token))
        out.append(position)
    return out


def wire_logprobs(tokens: list[TokenLogprob] | None, as_ids: bool = False) -> ChoiceLogprobs | None:
    if tokens is None:
        return None
    return ChoiceLogprobs(content=[
        WireTokenLogprob(token=token_text(t.token, t.id, as_ids), logprob=t.logprob, bytes=t.bytes,
                         top_logprobs=[WireTopLogprob(token=token_text(a.token, a.id, as_ids), logprob=a.logprob,
                                                      bytes=a.bytes) for a in t.top])
        for t in tokens])
