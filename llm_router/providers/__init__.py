"""One adapter per model SDK behind `ChatProvider`, and `build_provider` to make one from settings.

| provider  | SDK                        | the tool                                      | module          |
|-----------|----------------------------|-----------------------------------------------|-----------------|
| anthropic | `anthropic.AsyncAnthropic` | `tools`, forced by `tool_choice` type `tool`  | `anthropic.py`  |
| openai    | `openai.AsyncOpenAI`       | `tools`, forced by `tool_choice` function     | `openai.py`     |
| ollama    | `ollama.AsyncClient`       | `tools` (Ollama cannot force one)             | `ollama.py`     |
| langchain | any `BaseChatModel`        | `bind_tools`, `tool_choice=<name>` if it can  | `langchain.py`  |

Each adapter builds its SDK client once, with the SDK's own retries off
(the router retries, honouring `Retry-After`), sends one request per `ask`
bounded by its `timeout`, returns the first call to the request's tool as
an `Answer` (see `_common.answer`), and raises a `ProviderError` for any
failure of the call (see `_common`). The SDKs are imported here only when a
provider of theirs is built, so LangChain stays optional.

Keys: `build_provider` gets the key read from the model's `api_key_env` or
`api_key_file` and gives it to the SDK explicitly, so no SDK falls back to
its own environment variable for one. Anthropic and OpenAI without a
`base_url` need a key; an OpenAI-compatible server or Ollama may go
without.
"""

from __future__ import annotations

from llm_router.config import ModelConfig
from llm_router.interfaces import ChatProvider

LANGCHAIN_MISSING = "provider langchain needs langchain-core: pip install 'setpoint[langchain]'"


def build_provider(config: ModelConfig, *, api_key: str | None) -> ChatProvider:
    """The adapter for `config`; ValueError (one sentence, never the key) when it cannot be built."""
    if config.provider == "anthropic":
        from llm_router.providers.anthropic import AnthropicProvider

        if api_key is None:
            raise ValueError(f"anthropic {config.model} needs an API key: set api_key_env or api_key_file")
        return AnthropicProvider(model=config.model, api_key=api_key, base_url=config.base_url)
    if config.provider == "openai":
        from llm_router.providers.openai import OpenAIProvider

        return OpenAIProvider(model=config.model, api_key=api_key, base_url=config.base_url)
    if config.provider == "ollama":
        from llm_router.providers.ollama import OllamaProvider

        return OllamaProvider(model=config.model, api_key=api_key, base_url=config.base_url)
    try:
        from llm_router.providers.langchain import LangChainProvider, load_chat_model
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] == "langchain_core":
            raise ValueError(LANGCHAIN_MISSING) from None
        raise
    if config.factory is None:  # ModelConfig requires one; this only tells mypy
        raise ValueError(f"langchain {config.model} needs factory: 'module:callable'")
    chat_model = load_chat_model(
        config.factory, model=config.model, options=config.options, api_key=api_key, base_url=config.base_url
    )
    return LangChainProvider(model=config.model, chat_model=chat_model, base_url=config.base_url)


__all__ = ["LANGCHAIN_MISSING", "build_provider"]
