"""Multi-digit addition as a character-level task with a checkable answer.

A problem with ``digits = 3`` is the string ``^123+045=8610``: a BOS mark, both operands zero-padded
to ``digits`` characters, and the sum zero-padded to ``digits + 1`` characters and written
*least-significant digit first* (168 -> "0168" -> "8610"). Reversing the answer lets a
left-to-right model compute carries in the order it emits digits. Every sequence has the same
length, so batching needs no padding.
"""

from __future__ import annotations

import torch

VOCAB = "0123456789+=^"
PLUS, EQUALS, BOS = VOCAB.index("+"), VOCAB.index("="), VOCAB.index("^")


def prompt_len(digits: int) -> int:
    """Tokens before the answer: BOS, a, '+', b, '='."""
    return 2 * digits + 3


def seq_len(digits: int) -> int:
    """Prompt plus ``digits + 1`` answer tokens."""
    return prompt_len(digits) + digits + 1


def _to_digits(x: torch.Tensor, width: int) -> torch.Tensor:
    """Integers (n,) -> their decimal digits (n, width), most significant first."""
    powers = 10 ** torch.arange(width - 1, -1, -1, dtype=torch.int64)  # (width,)
    return (x[:, None] // powers) % 10


def answer_tokens(a: torch.Tensor, b: torch.Tensor, digits: int) -> torch.Tensor:
    """The correct answer (n, digits + 1), least-significant digit first."""
    return _to_digits(a + b, digits + 1).flip(1)


def encode(a: torch.Tensor, b: torch.Tensor, digits: int) -> torch.Tensor:
    """Full token sequences (n, seq_len) with the correct answer."""
    n = a.shape[0]
    col = torch.full((n, 1), 0, dtype=torch.int64)
    return torch.cat(
        [
            col + BOS,
            _to_digits(a, digits),
            col + PLUS,
            _to_digits(b, digits),
            col + EQUALS,
            answer_tokens(a, b, digits),
        ],
        dim=1,
    )


def decode(tokens: torch.Tensor) -> list[str]:
    """Token rows -> strings, for logs and cards."""
    return ["".join(VOCAB[t] for t in row.tolist()) for row in tokens]


def heldout_set(digits: int, n: int = 1000, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation problems; training streams never contain them."""
    gen = torch.Generator().manual_seed(seed)
    hi = 10**digits
    codes = torch.randperm(hi * hi, generator=gen)[:n] if hi <= 1000 else None
    if codes is None:
        a = torch.randint(0, hi, (n,), generator=gen)
        b = torch.randint(0, hi, (n,), generator=gen)
        return a, b
    return codes // hi, codes % hi


class ProblemStream:
    """Seeded random addition problems that skip the held-out set."""

    def __init__(self, digits: int, seed: int, heldout: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.digits = digits
        self.gen = torch.Generator().manual_seed(seed)
        self.hi = 10**digits
        self.heldout_codes = heldout[0] * self.hi + heldout[1]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n problems as operand tensors (a, b), each (n,)."""
        out_a, out_b, have = [], [], 0
        while have < n:
            a = torch.randint(0, self.hi, (n,), generator=self.gen)
            b = torch.randint(0, self.hi, (n,), generator=self.gen)
            keep = ~torch.isin(a * self.hi + b, self.heldout_codes)
            out_a.append(a[keep])
            out_b.append(b[keep])
            have += int(keep.sum())
        return torch.cat(out_a)[:n], torch.cat(out_b)[:n]
