"""The search tool for verl's tool agent loops: a Search-R1 ``/retrieve`` server behind verl's ``BaseTool``.

verl 0.9 ships no search tool (only ``BaseTool`` and ``@function_tool``). Declare this one in the
file that ``actor_rollout_ref.rollout.multi_turn.tool_config_path`` names::

    tools:
      - class_name: igpo_rewards.integrations.verl_search.SearchTool
        config:
          type: native
          retrieval_url: http://127.0.0.1:8000/retrieve   # igpo-retrieve serve, or any Search-R1 server
          topk: 3
          timeout: 30

The model calls ``search`` with ``{"query": "..."}`` (through verl's tool parser, e.g. hermes
``<tool_call>`` JSON); the tool POSTs the query to the server and answers with the documents in
Search-R1's layout (``Doc 1(Title: "...") text``, one per line, ``No documents found.`` when
nothing matches). A failing server raises; verl's tool agent loop turns that into an error text
for the model and logs it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from igpo_rewards.agent.retrieval import HTTPRetriever, format_observation

__all__ = ["SEARCH_TOOL_SCHEMA", "SearchTool"]

SEARCH_TOOL_SCHEMA = OpenAIFunctionToolSchema.model_validate(
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the corpus and return the top passages.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "what to look up"}},
                "required": ["query"],
            },
        },
    }
)
"""The schema used when the tool config gives none (verl renders it into the chat template's tools)."""


class SearchTool(BaseTool):
    """verl ``BaseTool`` ``search``: one query -> the top ``topk`` documents of a ``/retrieve`` server.

    Config keys: ``retrieval_url`` (required; "/retrieve" is appended when missing), ``topk``
    (default 3), ``timeout`` in seconds (default 30).
    """

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None = None):
        if not isinstance(config, dict) or not config.get("retrieval_url"):
            raise ValueError(f"SearchTool needs config['retrieval_url'] (a Search-R1 /retrieve URL), got {config!r}")
        topk = config.get("topk", 3)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"SearchTool config['topk'] must be a positive int, got {topk!r}")
        super().__init__(config, tool_schema or SEARCH_TOOL_SCHEMA)
        self.retriever = HTTPRetriever(str(config["retrieval_url"]), timeout=float(config.get("timeout", 30.0)))
        self.topk = topk

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        """Returns (the documents as text, tool reward 0.0, {"num_documents": n})."""
        query = parameters.get("query") if isinstance(parameters, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"search needs a non-empty string 'query', got parameters {parameters!r:.200}")
        (documents,) = await asyncio.to_thread(self.retriever.search, [query.strip()], self.topk)
        return ToolResponse(text=format_observation(documents)), 0.0, {"num_documents": len(documents)}
