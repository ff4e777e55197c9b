"""How the LoRA levels learn what users say: self-study notes (`study`, `notes`), the losses
(`objectives`), one rehearsal (`rehearsal`), the per-turn learner (`turn`) and consolidation."""
