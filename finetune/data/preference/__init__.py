"""Preference data: `pairs` (prompt, chosen, rejected) for dpo/simpo/orpo, `labelled` answers for kto, `prepare`
for both (split, tokenised, cached)."""
