"""Reference trainer: a multi-turn search agent trained with IGPO (or GRPO) end to end.

Readable top to bottom like cleanrl, one module per job. The data flow of one RL step:

1. ``world.build_world`` (or ``world.load_qa_parquet`` + ``igpo_rewards.agent.retrieval.read_corpus_jsonl``) gives
   ``QAExample`` questions with answer aliases and a corpus of ``Document`` s.
2. ``igpo_rewards.agent.protocol.build_prompt`` wraps a question in the Search-R1 instruction
   (chat template).
3. ``rollout.rollout_examples`` samples G trajectories per question with the library's loop
   (``igpo_rewards.agent.rollout``: HF ``generate`` at temperature 1, stop on ``</search>`` /
   ``</answer>``); each ``<search>`` query goes to a retriever (``igpo_rewards.agent.bm25.BM25Retriever`` or
   ``igpo_rewards.agent.retrieval.HTTPRetriever``) and the formatted documents are inserted
   inside ``<information>..</information>``; a malformed turn ends the rollout. Each
   ``QATrajectory`` keeps the exact token ids, the spans of generated turns and of
   observations, and its scores, computed once: the outcome
   ``igpo_rewards.outcome_reward(response, answers)``, EM and F1.
4. ``igpo_rewards.agent.probes`` runs ONE packed forward per batch that returns the old log-probs of the
   generated tokens and the ground-truth probe log-probs before every turn.
5. ``igpo_rewards.answer_logprob`` -> ``igpo_rewards.igpo_advantages`` (IGPO: information
   gain turn rewards + outcome, group-normalized, discounted) or
   ``igpo_rewards.grpo_advantages`` (GRPO: outcome only) give one advantage per turn.
6. ``igpo_rewards.broadcast_to_tokens`` puts each turn's advantage on its generated tokens
   (prompt and observation tokens get none and are excluded from the loss).
7. ``training.policy_loss``: PPO clipped surrogate + k3 KL to the frozen warm-start reference,
   token mean within a sequence then mean over sequences; AdamW with gradient clipping.

Around the step: ``warm_start`` (SFT on imperfect demonstrations, the start of every RL run),
``checkpoint`` (atomic safetensors checkpoints, exact resume), ``evaluation`` (greedy EM/F1 by
hop count or per data source; per question for the experiment's pairs), ``report`` (report.md
with plots), ``config`` and ``cli`` (the ``igpo-train`` console script: ``demo``, ``train``,
``eval``, ``warm-start``, ``diagnose``, ``experiment``, ``report``).

Around the runs: ``experiment`` (``igpo-train experiment``: the methods of ``methods`` from each
seed's shared warm start, run as child processes by ``jobs``), ``paired`` (paired differences
with two-way bootstrap intervals) and ``experiment_report`` (its report.md and plots).
"""
