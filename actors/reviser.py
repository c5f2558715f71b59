"""CritiqueWorker: N rounds of critique -> revision per row (paper section 3.1), in an actor pool."""

from __future__ import annotations

import json
from typing import Any

from cai_ray.config import EngineConfig


class CritiqueWorker:
    """Adds `rounds` (a JSON list of round traces) to each live row of a pandas batch."""

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        constitution_path: str,
        settings: Any,  # cai_ray.sl.critique.CritiqueSettings
        *,
        too_long: str = "truncate",
        model_id: str | None = None,
    ):
        from dataclasses import replace

        from cai_ray.constitution import load_constitution
        from cai_ray.data.conversation import PromptFormat
        from cai_ray.engines import make_engine
        from cai_ray.sl.critique import ChainPrompter

        self.engine = make_engine(model_path, engine, model_id=model_id)
        settings = replace(settings, fmt=PromptFormat.of(settings.fmt).load(model_path))
        constitution = load_constitution(constitution_path)
        self.prompter = ChainPrompter(constitution, settings)
        self.too_long = too_long

    def __call__(self, batch: Any) -> Any:
        from cai_ray.data.conversation import Conversation
        from cai_ray.sl.critique import run_chains

        batch = batch.copy()
        rejects = list(batch["reject"])
        rounds = ["[]"] * len(batch)
        live = [i for i, r in enumerate(rejects) if not r]
        items = [
            (
                batch["prompt_id"].iloc[i],
                Conversation.from_messages(json.loads(batch["messages"].iloc[i])),
                batch["initial_answer"].iloc[i],
            )
            for i in live
        ]
        results = run_chains(self.engine, self.prompter, items, too_long=self.too_long)
        for i, res in zip(live, results, strict=True):
            if res.reject:
                rejects[i] = res.reject
            rounds[i] = json.dumps([r.to_row() for r in res.rounds])
        batch["rounds"] = rounds
        batch["reject"] = rejects
        return batch
