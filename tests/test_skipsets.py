"""Skip sets as values (phi3skip.model.skipsets.SkipSet): checked once when made, then passed through as they are,
by the model's forward and by the Generator's decode step alike."""
import pickle

import pytest
import torch

from phi3skip import Phi3Config, Phi3ForCausalLM
from phi3skip.model import skipsets
from phi3skip.model.skipsets import InvalidSkip, SkipSet, validate_skip
from phi3skip.serve.generate import Generator

CFG = dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=64, original_max_position_embeddings=64)


def test_a_skip_set_is_a_checked_frozenset():
    s = SkipSet([3, 1], 4)
    assert s == frozenset({1, 3}) and 3 in s and 2 not in s and s.num_layers == 4
    assert SkipSet.of(s, 4) is s  # no second check
    assert validate_skip(s, 4) is s
    other = SkipSet.of(s, 6)  # another model's: checked again, for that model
    assert other is not s and other == s and other.num_layers == 6
    assert SkipSet.of(None, 4) == frozenset() and isinstance(SkipSet.of((), 4), SkipSet)
    back = pickle.loads(pickle.dumps(s))  # distributed collectives and multiprocessing pickle them
    assert back == s and back.num_layers == 4 and isinstance(back, SkipSet)
    assert repr(s) == "SkipSet([3, 1], num_layers=4)"


@pytest.mark.parametrize("bad", [(4,), (-1,), (1, 1), (1.5,), ("1",), (True,), "12", 3])
def test_bad_sets_are_refused_when_made(bad):
    with pytest.raises(InvalidSkip, match=r"0\.\.3"):
        SkipSet(bad, 4)
    with pytest.raises(InvalidSkip):  # a set of a bigger model is checked again for this one
        SkipSet.of(SkipSet([5], 6), 4)


def _count_checks(monkeypatch) -> list:
    calls = []
    real = skipsets._checked

    def counting(skip, n):
        calls.append(tuple(skip) if skip is not None else None)
        return real(skip, n)

    monkeypatch.setattr(skipsets, "_checked", counting)
    return calls


@torch.no_grad()
def test_forward_checks_a_raw_set_and_passes_a_skip_set(monkeypatch):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config.from_dict(CFG)).eval()
    x = torch.randint(0, 64, (1, 8))
    calls = _count_checks(monkeypatch)
    raw = model(x, skip=(2,))
    assert len(calls) == 1
    s = SkipSet((2,), 4)
    calls.clear()
    assert torch.equal(model(x, skip=s), raw)
    assert calls == [], "a SkipSet was checked again by the forward"


@torch.no_grad()
def test_the_decode_step_does_not_check_again(monkeypatch):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config.from_dict(CFG)).eval()
    calls = _count_checks(monkeypatch)
    gen = Generator(model, (3, 1), draft_skip=(3, 2, 1), lookahead=2)
    made = len(calls)
    assert made >= 1  # the sets were checked where the Generator was built
    plain = Generator(model, SkipSet((3, 1), 4))
    calls.clear()
    out = plain.generate([[1, 2, 3]], max_new_tokens=12)
    assert len(out.tokens[0]) + (out.finish[0] == "stop") == 12
    assert calls == [], f"decoding checked skip sets {len(calls)} times"
    spec = gen.generate([[1, 2, 3]], max_new_tokens=12)
    assert calls == [] and spec.tokens == out.tokens  # greedy speculative decoding equals plain greedy
