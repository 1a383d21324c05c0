"""A chat request's sampling, constraint and logprob options -> the engine protocol's `Sampling`, and the
engine's token logprobs -> OpenAI's `logprobs` shape. The constraint is handed to the engine as it is: the
engine's structured-output backend compiles it (a schema that does not compile is a 400 naming the field)."""

from __future__ import annotations

from service.engine.base import Constraint, Sampling, TokenLogprob
from service.errors import BadRequest
from service.protocol.chat import ChatCompletionRequest, ChoiceLogprobs
from service.protocol.chat import TokenLogprob as WireTokenLogprob
from service.protocol.chat import TopLogprob as WireTopLogprob


def sampling_for(req: ChatCompletionRequest, max_tokens: int, vocab_size: int,
                 forced_tool_schema: dict | None = None) -> Sampling:
    """The engine's sampling for `req`; `forced_tool_schema` (a required or named tool_choice) constrains the
    output to the one call it allows."""
    logit_bias = {int(token): bias for token, bias in req.logit_bias.items()} if req.logit_bias else None
    for param, ids in (("logit_bias", logit_bias), ("stop_token_ids", req.stop_token_ids),
                       ("allowed_token_ids", req.allowed_token_ids)):
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
        min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, logprobs=req.top_logprobs_wanted,
        logit_bias=logit_bias, constraint=constraint, stop_token_ids=req.stop_token_ids, bad_words=req.bad_words,
        allowed_token_ids=req.allowed_token_ids, skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def wire_logprobs(tokens: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if tokens is None:
        return None
    return ChoiceLogprobs(content=[
        WireTokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                         top_logprobs=[WireTopLogprob(token=tok, logprob=lp, bytes=b) for tok, lp, b in t.top])
        for t in tokens])
