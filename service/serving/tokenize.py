"""`/tokenize` and `/detokenize`: a prompt's tokens as the engine will see them, without generating.

A chat body is rendered by the chat path itself (`ChatService.render`: media fetched under the same address
policy and caps, the chat template, tools), so its count is exactly what a chat completion's context check and
usage count; images and videos are expanded as the engine expands them. The engine is not involved: nothing is
queued, and no adapter is loaded (`model` is checked against what the caller's key may use, as /v1/models
lists it; adapters share the base model's tokenizer).
"""

from __future__ import annotations

from pydantic import ValidationError

from service.auth import OPEN, Tenant
from service.errors import BadRequest, ModelNotFound, validation_message
from service.protocol.chat import ChatCompletionRequest
from service.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizePromptRequest,
    TokenizeResponse,
)
from service.serving.chat import ChatService


class TokenizeService:
    def __init__(self, chat: ChatService):
        self.chat = chat
        self.renderer = chat.renderer

    def _check_model(self, model: str | None, tenant: Tenant) -> str:
        registry = self.chat.registry
        if model is None or (model == registry.base_name and tenant.base):
            return registry.base_name
        if model != registry.base_name and registry.known(model) and tenant.may_use_adapter(model.partition("@")[0]):
            return model  # an adapter the caller may use (a pinned NAME@REV is not looked up: same tokenizer)
        raise ModelNotFound.named(model)

    async def tokenize(self, req: TokenizeChatRequest | TokenizePromptRequest, tenant: Tenant = OPEN) -> TokenizeResponse:
        model = self._check_model(req.model, tenant)
        tokenizer = self.renderer.tokenizer
        if isinstance(req, TokenizePromptRequest):
            ids = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        else:
            body = req.model_dump(include={"messages", "tools", "add_generation_prompt", "continue_final_message",
                                           "chat_template_kwargs", "mm_processor_kwargs", "documents"},
                                  exclude_none=True,
                                  by_alias=True)
            try:  # the chat path's own checks across fields (e.g. the roles' order), as a chat completion meets them
                chat = ChatCompletionRequest.model_validate({"model": model, **body})
            except ValidationError as exc:
                message, param = validation_message(exc)
                raise BadRequest(message, param=param) from None
            rendered = await self.chat.render(chat)
            ids = self.renderer.expand(rendered.ids, rendered.image_tokens, rendered.video_ids)
            if req.add_special_tokens:
                ids = tokenizer.build_inputs_with_special_tokens(ids)
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.chat.engine.max_model_len, tokens=ids,
                                token_strs=strs)

    def detokenize(self, req: DetokenizeRequest, tenant: Tenant = OPEN) -> DetokenizeResponse:
        self._check_model(req.model, tenant)
        beyond = sorted({t for t in req.tokens if t >= self.renderer.vocab_size})
        if beyond:
            raise BadRequest(f"tokens holds token id(s) {beyond[:5]} outside the vocabulary (size "
                             f"{self.renderer.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.renderer.tokenizer.decode(req.tokens))
