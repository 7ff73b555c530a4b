"""generate(): the reference demo's loop semantics and the tracer call protocol."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.model import model as M  # noqa: E402
from kvtier.model.args import ModelArgs  # noqa: E402
from kvtier.model.generate import generate, sample  # noqa: E402
from kvtier.model.random_init import init_random_  # noqa: E402

NO_EOS = -7  # an id the model never produces


pytestmark = pytest.mark.usefixtures("torch_fp32_one_thread")


@pytest.fixture(scope="module")
def model():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        m = init_random_(M.Transformer(ModelArgs.builtin("tiny", dtype="fp32", max_seq_len=64)), 3)
    finally:
        torch.set_default_dtype(prev)
    return m.eval()


class FakeTracer:
    """Records the protocol: every call with its arguments, in order."""

    def __init__(self):
        self.events = []

    def begin_batch(self, request_ids, prompt_tokens):
        self.events.append(("begin", list(request_ids), [list(p) for p in prompt_tokens]))

    def start_step(self, start_pos, active):
        self.events.append(("start", start_pos, list(active)))

    def on_topk(self, layer_id, indices, scores):
        self.events.append(("topk", layer_id, tuple(indices.shape), tuple(scores.shape)))

    def end_step(self, wall_s):
        self.events.append(("end", wall_s))

    def end_batch(self):
        self.events.append(("end_batch",))

    def kinds(self):
        return [e[0] for e in self.events]


class Spy:
    """Wraps the model and records every forward's (tokens, start_pos)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("inner", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def forward(self, tokens, start_pos):
        self.calls.append((tokens.clone(), start_pos, self.inner.tracer is not None))
        return self.inner.forward(tokens, start_pos)


def prompt(n, seed):
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_single_prompt_prefill_then_decodes_with_tracer(model):
    P, N = 20, 6
    spy, tr = Spy(model), FakeTracer()
    out = generate(spy, [prompt(P, 1)], N, NO_EOS, tracer=tr, request_ids=[0])
    assert len(out) == 1 and len(out[0]) == N
    # 1 prefill of P tokens at 0, then N-1 decodes at start_pos P..P+N-2; prefill untraced
    assert [(t.shape[1], s, traced) for t, s, traced in spy.calls] == [(P, 0, False)] + [
        (1, p, True) for p in range(P, P + N - 1)
    ]
    # the last sampled token is never fed back; decoded inputs are the previous outputs
    fed = [int(t[0, 0]) for t, _, _ in spy.calls[1:]]
    assert fed == out[0][:-1]
    assert tr.events[0] == ("begin", [0], [prompt(P, 1)])
    assert tr.events[-1] == ("end_batch",)
    step = ["start"] + ["topk"] * 3 + ["end"]
    assert tr.kinds() == ["begin"] + step * (N - 1) + ["end_batch"]
    starts = [e for e in tr.events if e[0] == "start"]
    assert starts == [("start", p, [True]) for p in range(P, P + N - 1)]
    topks = [e for e in tr.events if e[0] == "topk"]
    assert [e[1] for e in topks[:3]] == [0, 1, 2]
    assert all(e[2] == e[3] == (1, 16) for e in topks)
    assert all(e[1] > 0 for e in tr.events if e[0] == "end")
    assert model.tracer is None


def test_batch_of_different_lengths_teacher_forces_and_matches_single_runs(model):
    lens = [7, 12, 9]
    prompts = [prompt(n, 10 + i) for i, n in enumerate(lens)]
    spy, tr = Spy(model), FakeTracer()
    out = generate(spy, prompts, 5, NO_EOS, tracer=tr)
    # prefill of the shortest prompt, then teacher forcing of the longer prompts
    assert spy.calls[0][0].shape == (3, 7) and spy.calls[0][1] == 0
    for t, s, _ in spy.calls[1:]:
        for i, p in enumerate(prompts):
            if s < len(p):
                assert int(t[i, 0]) == p[s], (
                    "prompt tokens are fed while a row is still in its prompt"
                )
    # total_len = max_new + longest prompt -> forwards for cur_pos in [7, 17)
    assert [s for _, s, _ in spy.calls] == [0] + list(range(7, 16))
    for e in tr.events:
        if e[0] == "start":
            assert e[2] == [e[1] >= n for n in lens]
    assert tr.events[0][1] == [0, 1, 2]  # the trace's ids by default
    # rows do not interact: every completion equals the prompt run alone
    for i, p in enumerate(prompts):
        assert out[i] == generate(model, [p], 5, NO_EOS)[0]
    assert all(len(o) == 5 for o in out)


def test_eos_stops_rows_and_cuts_completions(model):
    p = prompt(10, 20)
    free = generate(model, [p], 8, NO_EOS)[0]
    eos = free[2]
    cut = free[: free.index(eos)]
    spy = Spy(model)
    out = generate(spy, [p], 8, eos)
    assert out == [cut]
    assert len(spy.calls) == free.index(eos) + 1  # stops once every row has finished
    # a finished row stays inactive while another keeps generating
    q = prompt(10, 21)
    tr = FakeTracer()
    both = generate(model, [p, q], 8, eos, tracer=tr)
    assert both[0] == cut
    starts = [e for e in tr.events if e[0] == "start"]
    done_at = 10 + free.index(eos)  # start_pos after the step that sampled EOS for row 0
    for _, pos, active in starts:
        assert active[0] == (pos < done_at)


def test_eos_inside_prompt_does_not_finish(model):
    short, long = prompt(4, 31), prompt(10, 30)
    eos = generate(model, [short], 1, NO_EOS)[0][0]  # row 0 finishes at its first token
    long[6] = eos  # ... and row 1 is teacher-forced through an EOS id at cur_pos 6
    alone = generate(model, [long], 4, eos)[0]
    assert len(alone) == 4  # row 1 never generates EOS itself
    spy = Spy(model)
    assert generate(spy, [short, long], 4, eos) == [[], alone]
    assert len(spy.calls) == 10  # no early stop at cur_pos 6: cur_pos runs over [4, 14)


def test_total_len_capped_by_max_seq_len(model):
    out = generate(model, [prompt(60, 40)], 50, NO_EOS)
    assert len(out[0]) == 4  # max_seq_len 64


def test_length_one_prompt_prefill_is_not_traced(model):
    tr = FakeTracer()
    generate(model, [[5]], 3, NO_EOS, tracer=tr)
    assert [e[1] for e in tr.events if e[0] == "start"] == [1, 2]
    assert tr.kinds().count("topk") == 2 * 3


def test_errors(model):
    with pytest.raises(ValueError, match="max_batch_size"):
        generate(model, [[1]] * 5, 2, NO_EOS)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], 2, NO_EOS)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 65], 2, NO_EOS)
    with pytest.raises(ValueError, match="request_ids"):
        generate(model, [[1]], 2, NO_EOS, request_ids=["a", "b"])


def test_forced_tokens_are_fed_and_traced_like_decoded_ones(model):
    """Forcing ids another implementation decoded replays exactly its decode steps."""
    p, q = prompt(9, 70), prompt(13, 71)
    fp, fq = prompt(5, 72), prompt(3, 73)  # not what this model would pick
    spy, tr = Spy(model), FakeTracer()
    out = generate(spy, [p, q], [5, 3], NO_EOS, tracer=tr, forced_tokens=[fp, fq])
    assert out == [fp, fq]
    # decode inputs: prompt tokens, then the forced ids, never a sample
    for t, s, _ in spy.calls[1:]:
        for i, row in enumerate((p + fp, q + fq)):
            if s < len(row):
                assert int(t[i, 0]) == row[s]
    # each row is traced for the steps that feed its forced ids, and stops after its cap
    starts = [(e[1], e[2]) for e in tr.events if e[0] == "start"]
    assert starts == [(pos, [9 <= pos < 9 + 4, 13 <= pos < 13 + 2]) for pos in range(9, 15)]
    assert [s for _, s, _ in spy.calls] == [0] + list(range(9, 15))  # stops: all rows done


def test_forcing_the_free_run_reproduces_it(model):
    p = prompt(11, 74)
    tr_free, tr_forced = FakeTracer(), FakeTracer()
    free = generate(model, [p], 6, NO_EOS, tracer=tr_free)[0]
    # forcing the first half, then sampling again: the same greedy continuation
    assert generate(model, [p], 6, NO_EOS, forced_tokens=[free[:3]]) == [free]
    assert generate(model, [p], [6], NO_EOS, tracer=tr_forced, forced_tokens=[free]) == [free]
    def protocol(tr):
        return [e for e in tr.events if e[0] != "end"]  # end carries the wall time

    assert protocol(tr_forced) == protocol(tr_free) and tr_forced.kinds() == tr_free.kinds()


def test_forced_eos_ends_the_row_and_per_row_caps(model):
    p = prompt(8, 75)
    spy = Spy(model)
    assert generate(spy, [p], 10, 42, forced_tokens=[[7, 8, 42]]) == [[7, 8]]
    assert len(spy.calls) == 3  # prefill + 2 decodes, then EOS finished the row
    # per-row caps alone (no forcing): rows stop after their own count
    out = generate(model, [p, prompt(8, 76)], [2, 5], NO_EOS)
    assert [len(o) for o in out] == [2, 5]
    assert out[1] == generate(model, [prompt(8, 76)], 5, NO_EOS)[0]


def test_forcing_errors(model):
    with pytest.raises(ValueError, match="row 0 forces 3 tokens, more than max_new_tokens 2"):
        generate(model, [[1, 2]], 2, NO_EOS, forced_tokens=[[3, 4, 5]])
    with pytest.raises(ValueError, match="row 0 forces eos_id 9 at offset 1, before its last"):
        generate(model, [[1, 2]], 5, 9, forced_tokens=[[3, 9, 5]])
    with pytest.raises(ValueError, match="forced token ids of row 1 must be >= 0"):
        generate(model, [[1], [2]], 5, NO_EOS, forced_tokens=[[3], [-1]])
    with pytest.raises(ValueError, match="prompt ids of row 0 must be >= 0"):
        generate(model, [[1, -1]], 5, NO_EOS)
    with pytest.raises(ValueError, match="forced_tokens and prompt_tokens differ"):
        generate(model, [[1]], 5, NO_EOS, forced_tokens=[[3], [4]])
    with pytest.raises(ValueError, match=r"prompt \(60\) \+ forced tokens \(6\) exceed max_seq_len 64"):
        generate(model, [[1] * 60], 8, NO_EOS, forced_tokens=[[3] * 6])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, [[1], [2]], [3, 0], NO_EOS)
    with pytest.raises(ValueError, match="max_new_tokens and prompt_tokens differ"):
        generate(model, [[1]], [3, 3], NO_EOS)
    # ids the embedding does not have: one clear line, not an IndexError from the embedding
    with pytest.raises(ValueError, match="prompt ids of row 0 hold 1024, outside the model's vocab_size 1024"):
        generate(model, [[1, 1024]], 3, NO_EOS)
    with pytest.raises(ValueError, match="forced token ids of row 0 hold 5000, outside"):
        generate(model, [[1]], 3, NO_EOS, forced_tokens=[[5000]])


def test_tracer_end_batch_called_on_error(model):
    class Boom(FakeTracer):
        def end_step(self, wall_s):
            raise RuntimeError("boom")

    tr = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, [prompt(5, 50)], 4, NO_EOS, tracer=tr)
    assert tr.events[-1] == ("end_batch",) and model.tracer is None


def test_sample_greedy_and_gumbel_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, 0.0).tolist() == [1]
    torch.manual_seed(0)
    probs = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / 0.7, -1)
    draws = sample(torch.tensor([0.0, 1.0, 2.0]).repeat(40000, 1), 0.7)
    freq = np.bincount(draws.numpy(), minlength=3) / 40000
    np.testing.assert_allclose(freq, probs.numpy(), atol=0.01)


def test_temperature_sampling_is_seeded(model):
    torch.manual_seed(5)
    a = generate(model, [prompt(8, 60)], 5, NO_EOS, temperature=1.0)
    torch.manual_seed(5)
    b = generate(model, [prompt(8, 60)], 5, NO_EOS, temperature=1.0)
    assert a == b
