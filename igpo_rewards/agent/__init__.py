"""The Search-R1 agent side of IGPO, for trainers and integrations (the ``hf`` extra:
``pip install "igpo-rewards[hf] @ git+$IGPO_GIT"``, README "Install").

Submodules (import them directly; this package imports none of them, and
``import igpo_rewards`` does not import this package):

- :mod:`igpo_rewards.agent.protocol`: the Search-R1 protocol: tags, the instruction, the probe
  text and template, the parser of one generated turn, the observation block. Pure Python.
- :mod:`igpo_rewards.agent.retrieval`: the ``Retriever`` interface, ``Document``, the Search-R1
  ``/retrieve`` HTTP client, ``format_observation`` and the corpus jsonl files. Pure Python.
- :mod:`igpo_rewards.agent.tool_calls`: the Search-R1 protocol as tool calls: the ``search`` tool
  function and a search environment for tool-calling trainers (TRL's ``tools=`` /
  ``environment_factory=``), the chat template that renders a ``search`` call as
  ``<search> q </search>`` and a tool result as the observation block, and the response
  template that parses it back. Pure Python.
- :mod:`igpo_rewards.agent.bm25`: ``BM25Retriever``, an in-process BM25 index (bm25s) over a list
  of documents. Needs the ``server`` (or ``trainer``) extra.
- :mod:`igpo_rewards.agent.retrieval_server`: the ``igpo-retrieve`` command, a Search-R1
  compatible ``/retrieve`` server of that index (FastAPI). Needs the ``server`` extra.
- :mod:`igpo_rewards.agent.rollout`: the batched multi-turn HF ``generate`` loop with a
  retriever, over a flat list of prompts (``generate_rollouts``) or G rollouts per question
  (``rollout_questions``). Needs torch and transformers.
- :mod:`igpo_rewards.agent.probes`: the probe before every turn, every probe of a batch in one
  forward (``score_probes``; ``probe_forward`` also returns the PPO old log-probs). Needs torch
  and transformers.
"""
