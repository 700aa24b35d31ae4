"""GRPO's seeded sampling (finetune.run.sampling): a completion's draws depend on its seed alone, and the draws
follow the tempered, nucleus-filtered distribution."""

import torch

from finetune.run.sampling import SeededSampler, row_seeds


def draw(logits: torch.Tensor, seeds: torch.Tensor, prompt_width: int = 3, temperature: float = 1.0,
         top_p: float = 1.0, tokens: int = 1) -> torch.Tensor:
    """The tokens drawn at each of `tokens` generation steps (the same logits each step), rows x tokens."""
    sampler = SeededSampler(seeds, temperature, top_p)
    drawn = [sampler(torch.zeros(len(seeds), prompt_width + step, dtype=torch.long), logits).argmax(-1)
             for step in range(tokens)]
    return torch.stack(drawn, dim=1).squeeze(1)


def test_a_rows_draw_depends_on_its_seed_not_on_its_batch_or_the_prompts_padding():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    seeds = row_seeds(7, round_step=3, first_row=0, rows=6, device="cpu")
    whole = draw(logits, seeds, tokens=4)
    # the last three rows as another process generates them: numbered from row 3, padded to another width
    part = draw(logits[3:], row_seeds(7, round_step=3, first_row=3, rows=3, device="cpu"), prompt_width=9, tokens=4)
    assert torch.equal(whole[3:], part)
    assert len({tuple(row.tolist()) for row in whole}) > 1 and len(set(whole[0].tolist())) > 1  # fresh noise each
    other_round = draw(logits, row_seeds(7, round_step=4, first_row=0, rows=6, device="cpu"), tokens=4)
    other_seed = draw(logits, row_seeds(8, round_step=3, first_row=0, rows=6, device="cpu"), tokens=4)
    assert not torch.equal(whole, other_round) and not torch.equal(whole, other_seed)
    assert len(set(row_seeds(7, 3, 0, 1000, "cpu").tolist())) == 1000  # every row its own seed


def test_draws_follow_the_tempered_distribution_and_never_leave_the_nucleus():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log().repeat(20000, 1)
    seeds = row_seeds(1, round_step=0, first_row=0, rows=20000, device="cpu")
    counts = torch.bincount(draw(logits, seeds), minlength=4) / 20000
    torch.testing.assert_close(counts, probabilities, atol=0.015, rtol=0)
    hot = torch.softmax(probabilities.log() / 2.0, -1)  # temperature 2 flattens the distribution
    counts = torch.bincount(draw(logits, seeds, temperature=2.0), minlength=4) / 20000
    torch.testing.assert_close(counts, hot, atol=0.015, rtol=0)
    nucleus = torch.bincount(draw(logits, seeds, top_p=0.7), minlength=4) / 20000  # 0.5 + 0.3 reach 0.7
    assert nucleus[2:].sum() == 0
    torch.testing.assert_close(nucleus[:2], torch.tensor([0.625, 0.375]), atol=0.015, rtol=0)
