"""compression/: codecs under the installed numpy, config validation, byte-accounting maths, the flat PowerSGD
layout, and real groups of 2 and 4 peers on loopback."""

from __future__ import annotations

import math
import multiprocessing as mp

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    ScaledFloat16Compression,
    TensorRole,
    deserialize_torch_tensor,
)
from hivemind.proto import runtime_pb2

from convforever.compression import (
    MODES,
    STATE_MODES,
    CompressionConfig,
    SegmentCompression,
    TrafficCounters,
    TrafficSnapshot,
    build_averaging_kwargs,
    butterfly_bytes_sent,
    compression_ratio,
    cut_at_pivots,
    fp32_bytes,
    gradient_codec,
    state_codec,
)
from convforever.compression.codecs import FACTORS, WHOLE
from convforever.compression.loopback import STATE_MODE, GroupSpec, PairSpec, run_group, run_pair
from convforever.compression.warmup import is_warmup_round


def _heavy_tailed(numel: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=generator) * torch.rand(numel, generator=generator).pow(4) * 1e-3


# ---------------------------------------------------------------- codecs: the numpy<2.4 guard ----------------------

# (codec, max abs error as a fraction of max |x|): what each mode's codec may lose in one encode/decode
CODECS = [
    (NoCompression(), 0.0),
    (Float16Compression(), 1e-3),
    (ScaledFloat16Compression(), 1e-3),
    (BlockwiseQuantization(), 2e-2),
]


@pytest.mark.parametrize("codec,tolerance", CODECS, ids=lambda c: type(c).__name__ if not isinstance(c, float) else "")
@pytest.mark.parametrize("shape", [(3,), (1000,), (4096 * 3 + 17,), (64, 33)])
def test_codec_round_trips_through_hivemind_decoder(codec, tolerance, shape):
    """Receivers decode by the enum in the message (deserialize_torch_tensor), so that is the path tested.

    hivemind 1.1.12's quantizers call int() on a one-element numpy array, which numpy 2.4 rejects: this test is what
    fails first if the numpy<2.4 pin is ever lifted.
    """
    tensor = _heavy_tailed(math.prod(shape)).reshape(shape)
    message = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
    restored = deserialize_torch_tensor(message)
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    assert float((restored - tensor).abs().max()) <= tolerance * float(tensor.abs().max()) + 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_codec_round_trips_small_and_large(mode):
    codec = gradient_codec(CompressionConfig(mode=mode))
    for numel in (10, 100_000):
        tensor = _heavy_tailed(numel, seed=numel)
        restored = deserialize_torch_tensor(codec.compress(tensor, CompressionInfo.from_tensor(tensor)))
        assert float((restored - tensor).abs().max()) <= 2e-2 * float(tensor.abs().max())


@pytest.mark.parametrize("state_mode", STATE_MODES)
def test_state_codec_round_trips(state_mode):
    params = torch.randn(50_000) * 0.05
    codec = state_codec(CompressionConfig(state_compression=state_mode))
    restored = deserialize_torch_tensor(codec.compress(params, CompressionInfo.from_tensor(params)))
    assert float((restored - params).abs().max()) <= 2e-2 * float(params.abs().max())


def test_small_tensors_skip_8bit_because_the_codebook_outweighs_them():
    codec = gradient_codec(CompressionConfig(mode="8bit", min_8bit_numel=2048))
    small, large = torch.randn(500), torch.randn(100_000)
    small_bytes = codec.compress(small, CompressionInfo.from_tensor(small)).ByteSize()
    large_bytes = codec.compress(large, CompressionInfo.from_tensor(large)).ByteSize()
    assert small_bytes < 2 * 500 + 64  # scaled fp16, not 500 + 1 KiB codebook
    assert large_bytes < 1.1 * 100_000


# ---------------------------------------------------------------- config --------------------------------------------


def test_config_defaults_are_valid():
    config = CompressionConfig()
    assert config.mode == "powersgd-8bit" and config.rank == 4 and config.state_compression == "fp16"
    assert config.layout == "per-tensor" and config.whole_codec == "fp16"


@pytest.mark.parametrize("field,value", [("layout", "columns"), ("whole_codec", "int4")])
def test_unknown_layout_or_whole_codec_names_the_choices(field, value):
    with pytest.raises(ValueError, match=f"{value!r}.*choose one of"):
        CompressionConfig(**{field: value})


def test_unknown_mode_names_the_flag_and_the_choices():
    with pytest.raises(ValueError) as error:
        CompressionConfig(mode="int4")
    message = str(error.value)
    assert "--compression" in message and "'int4'" in message
    assert all(mode in message for mode in MODES)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_rank_must_be_a_positive_integer(rank):
    with pytest.raises(ValueError, match="rank"):
        CompressionConfig(mode="powersgd", rank=rank)


def test_unknown_state_compression_names_the_choices():
    with pytest.raises(ValueError, match="state-compression.*none, fp16, 8bit"):
        CompressionConfig(state_compression="powersgd")


# ---------------------------------------------------------------- byte-accounting maths -----------------------------


def test_fp32_bytes_counts_four_bytes_per_value():
    assert fp32_bytes([torch.zeros(3, 4), torch.zeros(5)]) == 4 * 17


def test_butterfly_pair_sends_one_payload():
    assert butterfly_bytes_sent(1000, [0.5, 0.5], own_index=0, num_senders=2) == 1000


def test_butterfly_large_group_approaches_two_payloads():
    assert butterfly_bytes_sent(1000, [1, 1, 1, 1], own_index=2, num_senders=4) == 1500


def test_butterfly_client_sends_everything_once_and_reduces_nothing():
    assert butterfly_bytes_sent(1000, [0.0, 1.0, 1.0], own_index=0, num_senders=3) == 1000


def test_butterfly_auxiliary_only_returns_averages():
    # an aux peer reduces a share but sends no tensors of its own
    assert butterfly_bytes_sent(1000, [0.5, 0.5], own_index=1, num_senders=1, own_is_sender=False) == 500


def test_compression_ratio_is_fp32_over_bytes_per_round():
    assert compression_ratio(1_000_000, bytes_sent=20_000, rounds=2) == 100.0
    assert math.isnan(compression_ratio(1_000_000, bytes_sent=0, rounds=0))


def test_snapshot_delta_recomputes_the_per_round_reference():
    earlier = TrafficSnapshot(grad_bytes_sent=100, grad_rounds=1, grad_fp32_reference_bytes=4000,
                              fp32_bytes_per_round=4000)
    later = TrafficSnapshot(grad_bytes_sent=300, grad_rounds=3, grad_fp32_reference_bytes=12000,
                            fp32_bytes_per_round=4000)
    delta = later - earlier
    assert delta.grad_bytes_sent == 200 and delta.grad_rounds == 2
    assert delta.fp32_bytes_per_round == 4000
    assert delta.bytes_per_round_sent == 100 and delta.ratio_vs_fp32 == 40.0


def _add_in_child(counters: TrafficCounters) -> None:
    counters.add(grad_bytes_sent=7, state_rounds=1)


def test_counters_made_before_fork_see_child_increments():
    counters = TrafficCounters()
    counters.set_fp32_payload_bytes(4000)
    child = mp.get_context("fork").Process(target=_add_in_child, args=(counters,))
    child.start()
    child.join(10)
    snapshot = counters.snapshot()
    assert snapshot.grad_bytes_sent == 7 and snapshot.state_rounds == 1
    assert snapshot.fp32_bytes_per_round == 4000  # no round yet: the static pair estimate


# ---------------------------------------------------------------- the flat PowerSGD layout -------------------------


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (1, 1, 1, 1), (0.3, 0.0, 0.7), (0.1, 0.2, 0.3, 0.4)])
def test_flat_chunks_land_whole_on_the_peer_whose_share_they_are(fractions):
    """hivemind assigns each part to a peer by its own pivots; each chunk must go to one peer, shares unchanged."""
    lengths = [7_000, 0, 3_001, 50]
    chunks = cut_at_pivots(lengths, fractions)
    assert all(stop > start for _, start, stop in chunks)
    for segment, length in enumerate(lengths):  # chunks tile every segment in order
        starts = [start for s, start, _ in chunks if s == segment]
        stops = [stop for s, _, stop in chunks if s == segment]
        assert (starts, stops[-1:]) == (([0] + stops[:-1], [length]) if length else ([], []))
    flats = [torch.arange(n, dtype=torch.float32) for n in lengths]
    views = [flats[s][a:b] for s, a, b in chunks]
    container = TensorPartContainer(views, fractions, part_size_bytes=2**30)  # no further cutting
    total = sum(lengths)
    shares = [round(f / sum(fractions) * total) for f in fractions]
    for peer, share in enumerate(shares):
        parts = container.get_raw_input_parts(peer)
        assert abs(sum(part.numel() for part in parts) - share) <= len(fractions)  # the pivots' integer rounding
        # one chunk per segment that the share touches: no chunk was split between two peers
        assert len(parts) <= len([n for n in lengths if n]) and (share == 0) == (len(parts) == 0)


def test_flat_chunks_of_nothing_are_none():
    assert cut_at_pivots([0, 0], (0.5, 0.5)) == []


def test_segment_codec_sends_factors_and_whole_tensors_differently_with_registered_codecs():
    codec = SegmentCompression(factors=BlockwiseQuantization(), whole=ScaledFloat16Compression())
    tensor = _heavy_tailed(10_000)
    sent = {
        name: codec.compress(tensor, CompressionInfo.from_tensor(tensor, key=(name, 0), role=TensorRole.GRADIENT))
        for name in (FACTORS, WHOLE)
    }
    assert sent[FACTORS].compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT
    assert sent[WHOLE].compression == runtime_pb2.CompressionType.MEANSTD_16BIT
    for message in sent.values():  # the receiver needs nothing but the enum in the message
        restored = deserialize_torch_tensor(message)
        assert float((restored - tensor).abs().max()) <= 2e-2 * float(tensor.abs().max())
    plain = codec.compress(tensor, CompressionInfo.from_tensor(tensor, key=3))  # per-tensor layout: factor codec
    assert plain.compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT


@pytest.mark.parametrize("whole,expected", [("fp16", runtime_pb2.CompressionType.MEANSTD_16BIT),
                                            ("8bit", runtime_pb2.CompressionType.BLOCKWISE_8BIT)])
def test_flat_powersgd_8bit_picks_the_whole_tensor_codec(whole, expected):
    codec = gradient_codec(CompressionConfig(mode="powersgd-8bit", layout="flat", whole_codec=whole))
    tensor = torch.randn(10_000)
    assert codec.compress(tensor, CompressionInfo.from_tensor(tensor, key=(WHOLE, 1))).compression == expected


# ---------------------------------------------------------------- a real pair on 127.0.0.1 --------------------------

# a few layers' worth of small matrices too: per tensor, each of their factors would be a message of its own
PAIR_SHAPES = ((512, 256), (128, 64, 3, 3), (256,), (5000,), *[(256, 128)] * 8)
PAIR_RANK = 4


def low_rank_grads(peer: int, round_index: int) -> list[torch.Tensor]:
    """Matrices U C V with U, V fixed (rank 4) and C drawn per peer and round, plus 1-D noise.

    Their mean has rank 4, so PowerSGD rank 4 recovers it; the subspace stays put across rounds as a real gradient's
    roughly does, which is what PowerSGD's warm start (reusing last round's Q) relies on.
    """
    subspace = torch.Generator().manual_seed(12345)
    coefficients = torch.Generator().manual_seed(100 * peer + round_index)
    grads = []
    for shape in PAIR_SHAPES:
        if len(shape) == 1:
            grads.append(torch.randn(shape, generator=coefficients) * 1e-3)
            continue
        rows, cols = shape[0], math.prod(shape[1:])
        left, right = torch.randn(rows, 4, generator=subspace), torch.randn(4, cols, generator=subspace)
        mixing = torch.randn(4, 4, generator=coefficients)
        grads.append((left @ mixing @ right * 1e-3 / math.sqrt(cols)).reshape(shape))
    return grads


# the same maths in hivemind's own per-tensor layout, and 8-bit whole tensors, next to MODES (all flat)
PAIR_VARIANTS = (
    ("powersgd per-tensor", CompressionConfig(mode="powersgd", rank=PAIR_RANK, layout="per-tensor", warmup_steps=0)),
    ("powersgd-8bit per-tensor", CompressionConfig(mode="powersgd-8bit", rank=PAIR_RANK, layout="per-tensor",
                                                   warmup_steps=0)),
    ("powersgd-8bit whole=8bit", CompressionConfig(mode="powersgd-8bit", rank=PAIR_RANK, layout="flat",
                                                   whole_codec="8bit", warmup_steps=0)),
    ("powersgd-8bit warmup=1", CompressionConfig(mode="powersgd-8bit", rank=PAIR_RANK, layout="per-tensor",
                                                 warmup_steps=1)),
)


@pytest.fixture(scope="module")
def pair_results():
    spec = PairSpec(modes=MODES + (STATE_MODE,), variants=PAIR_VARIANTS, shapes=PAIR_SHAPES, grads_fn=low_rank_grads,
                    rounds=2, rank=PAIR_RANK, layout="flat", min_matchmaking_time=0.5, step_timeout=30,
                    run_id="test_compression")
    return {(r.mode, r.peer): r for r in run_pair(spec, timeout=400)}


def test_pair_counts_both_directions_for_every_mode(pair_results):
    payload = fp32_bytes(torch.zeros(shape) for shape in PAIR_SHAPES)
    for mode in MODES:
        for peer in (0, 1):
            snapshot = pair_results[mode, peer].snapshot
            assert snapshot.grad_rounds == 2
            assert snapshot.grad_bytes_sent > 0 and snapshot.grad_bytes_received > 0
            assert snapshot.grad_payload_bytes_sent < snapshot.grad_bytes_sent
            assert snapshot.fp32_bytes_per_round == payload  # a pair sends one fp32 payload per round


def test_pair_byte_ordering_between_modes(pair_results):
    sent = {mode: pair_results[mode, 0].snapshot.bytes_per_round_sent for mode in MODES}
    assert sent["8bit"] < sent["fp16"] < sent["none"]
    assert sent["powersgd"] * 5 < sent["none"]
    assert sent["powersgd-8bit"] < sent["powersgd"]
    assert 0.98 < pair_results["none", 0].snapshot.ratio_vs_fp32 <= 1.0  # protobuf headers cost under 2%


def test_pair_averages_correctly(pair_results):
    assert pair_results["none", 0].max_abs_error < 1e-9
    assert pair_results["fp16", 0].rel_l2_error < 1e-3
    assert pair_results["8bit", 0].rel_l2_error < 5e-2
    assert pair_results["powersgd", 0].rel_l2_error < 1e-3  # the mean is rank 4: nothing is lost
    # 8-bit P before orthogonalization costs ~10% on the big matrix per round; error feedback re-sends it next round
    assert pair_results["powersgd-8bit", 0].rel_l2_error < 0.15


def test_pair_state_averaging_counts_the_sender_half(pair_results):
    payload_fp16 = fp32_bytes(torch.zeros(shape) for shape in PAIR_SHAPES) // 2
    sent = [pair_results[STATE_MODE, peer].snapshot for peer in (0, 1)]
    assert all(s.state_rounds == 1 and s.state_bytes_sent > 0 for s in sent)
    # the two sender halves together are one fp16 copy of the tensors (plus headers)
    assert payload_fp16 <= sum(s.state_bytes_sent for s in sent) < 1.02 * payload_fp16
    assert pair_results[STATE_MODE, 0].rel_l2_error < 1e-3


def test_state_download_keeps_tiny_optimizer_statistics():
    """Adam's exp_avg_sq is ~grad**2; a lossy download flushes it to 0 and the next step divides by eps."""
    codec = build_averaging_kwargs(CompressionConfig(), TrafficCounters(), [torch.zeros(4, 4)])["load_state_compression"]
    exp_avg_sq = torch.full((64,), 1e-12)
    assert torch.equal(deserialize_torch_tensor(codec.compress(exp_avg_sq, info=None)), exp_avg_sq)


def test_flat_layout_changes_how_powersgd_travels_not_what_it_computes(pair_results):
    flat, per_tensor = pair_results["powersgd", 0], pair_results["powersgd per-tensor", 0]
    # the mean is rank 4, so both recover it up to float rounding (which differs: flat scales Q's columns first)
    assert flat.rel_l2_error < 1e-4 and per_tensor.rel_l2_error < 1e-4
    assert flat.extra["cumulative_rel_l2"] < 1e-4 and per_tensor.extra["cumulative_rel_l2"] < 1e-4
    # fp32 on the wire either way: the same payload, in at most one message per segment, phase and direction
    assert flat.snapshot.grad_payload_bytes_sent == per_tensor.snapshot.grad_payload_bytes_sent
    assert flat.snapshot.grad_parts_sent / flat.snapshot.grad_rounds <= 2 * 3


def test_flat_8bit_layout_sends_fewer_bytes_and_messages_at_the_same_error(pair_results):
    # per-tensor sends whole tensors of >= min_8bit_numel values in 8-bit, so compare with flat whole=8bit
    flat, per_tensor = pair_results["powersgd-8bit whole=8bit", 0], pair_results["powersgd-8bit per-tensor", 0]
    assert flat.snapshot.bytes_per_round_sent < per_tensor.snapshot.bytes_per_round_sent
    assert flat.snapshot.grad_parts_sent < per_tensor.snapshot.grad_parts_sent
    # error feedback repays the 8-bit factors: the sum over rounds is close to the exact sum either way
    assert flat.extra["cumulative_rel_l2"] < 0.1 and per_tensor.extra["cumulative_rel_l2"] < 0.1


def test_whole_tensors_in_8bit_cost_less_and_lose_about_one_percent(pair_results):
    fp16, eight = pair_results["powersgd-8bit", 0], pair_results["powersgd-8bit whole=8bit", 0]
    assert eight.snapshot.bytes_per_round_sent < fp16.snapshot.bytes_per_round_sent
    whole = [i for i, shape in enumerate(PAIR_SHAPES) if len(shape) == 1]
    fp16_error = max(fp16.extra["per_tensor_rel_l2"][i] for i in whole)
    eight_error = max(eight.extra["per_tensor_rel_l2"][i] for i in whole)
    assert fp16_error < 1e-3 < eight_error < 3e-2  # no error feedback for them: this is lost for good


# ---------------------------------------------------------------- a real group of 4 on 127.0.0.1 --------------------

GROUP_SIZE = 4


@pytest.fixture(scope="module")
def group_results():
    spec = GroupSpec(modes=("none", "powersgd", "powersgd-8bit"), shapes=PAIR_SHAPES, grads_fn=low_rank_grads, rounds=2,
                     rank=PAIR_RANK, layout="flat", peers=GROUP_SIZE, min_matchmaking_time=2.0, step_timeout=60,
                     run_id="test_compression_group")
    return {(r.mode, r.peer): r for r in run_group(spec, timeout=600)}


def test_group_of_four_averages_over_everyone(group_results):
    payload = fp32_bytes(torch.zeros(shape) for shape in PAIR_SHAPES)
    for peer in range(GROUP_SIZE):
        fp32 = group_results["none", peer]
        assert fp32.snapshot.grad_rounds == 2 and fp32.max_abs_error < 1e-9
        # butterfly: 2 (n - 1) / n payloads per peer and round at the balanced shares
        assert fp32.snapshot.fp32_bytes_per_round == payload * 3 // 2
    # hivemind cuts fp32 parts per tensor, so one peer's share drifts from its fraction; the group's total cannot
    # (each value leaves its sender once and comes back to n - 1 senders), and headers cost under 2%
    sent = sum(group_results["none", peer].snapshot.grad_bytes_sent for peer in range(GROUP_SIZE))
    assert 1.0 <= sent / (2 * 2 * (GROUP_SIZE - 1) * payload) < 1.02
    for peer in range(GROUP_SIZE):
        # fp32 factors: the flat buffers cut at four peers' shares reassemble exactly (the mean is rank 4)
        exact = group_results["powersgd", peer]
        assert exact.snapshot.grad_rounds == 2 and exact.rel_l2_error < 1e-3
        # 8-bit factors: 0.1-0.2 on these matrices (their mean's 4th singular value is small, and orthogonalizing P
        # amplifies 8-bit noise along it); a chunk landing at the wrong offset would give ~1
        powersgd = group_results["powersgd-8bit", peer]
        assert powersgd.snapshot.grad_rounds == 2 and powersgd.extra["cumulative_rel_l2"] < 0.3


def test_group_of_four_shares_flat_buffers_evenly(group_results):
    sent = [group_results["powersgd-8bit", peer].snapshot.grad_bytes_sent for peer in range(GROUP_SIZE)]
    assert max(sent) < 1.5 * min(sent)


def test_powersgd_warmup_sends_whole_gradients_first_then_factors(pair_results):
    """Round 0 (epoch 0 < warmup_steps 1) is a plain 8-bit all-reduce, round 1 PowerSGD, for both peers alike."""
    for peer in (0, 1):
        warm = pair_results["powersgd-8bit warmup=1", peer]
        eight_bit = pair_results["8bit", peer].extra["round_bytes_sent"]
        powersgd = pair_results["powersgd-8bit per-tensor", peer].extra["round_bytes_sent"]
        first, second = warm.extra["round_bytes_sent"]
        assert warm.snapshot.grad_rounds == 2  # the warm-up round is counted like any other
        assert abs(first - eight_bit[0]) < 0.05 * eight_bit[0], (first, eight_bit)
        assert abs(second - powersgd[1]) < 0.05 * powersgd[1], (second, powersgd)
        assert second * 5 < first
        # both rounds average correctly: the warm-up one to 8-bit precision, the PowerSGD one as without warm-up
        assert warm.extra["round_rel_l2"][0] < 5e-2
        assert warm.rel_l2_error < 0.15


@pytest.mark.parametrize("epochs, warmup, expected", [
    ([0, 0], 1, True), ([0, 3], 1, True), ([2, 3], 2, False), ([0, None], 5, False), ([0, 0], 0, False),
])
def test_warmup_round_is_decided_from_every_members_epoch(epochs, warmup, expected):
    gathered = [None if e is None else {"epoch": e} for e in epochs]
    assert is_warmup_round(gathered, warmup) is expected


def test_warmup_steps_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="--powersgd-warmup"):
        CompressionConfig(warmup_steps=-1)
