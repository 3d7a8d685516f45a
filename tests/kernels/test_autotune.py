"""Launch-config autotuning: keys, the choice of the fastest config, the cache file, and the rule that
the tile never changes a single output byte.

On CPU the GPU side is simulated: ``device_identity`` and the timer are replaced, and the interpreter
check is switched off for the lookup logic only (kernels that do run still run interpreted).
"""

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

from tests.activations import activation_like
from tritonquant.kernels import autotune, torch_dequantize, torch_quantize, triton_dequantize, triton_quantize
from tritonquant.kernels import dequantize as dequantize_module
from tritonquant.kernels import launch as launch_module
from tritonquant.kernels import quantize as quantize_module
from tritonquant.kernels.autotune import LaunchConfig, TuneKey
from tritonquant.kernels.launch import default_group_tile

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
GROUP = 256
H200 = ("NVIDIA H200", (9, 0))
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0))


pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


class FakeTimer:
    """Stands in for do_bench: the 'time' of a config comes from a table; records what it was asked."""

    def __init__(self, costs=None, default=1.0):
        self.costs = costs or {}
        self.default = default
        self.calls: list[LaunchConfig] = []

    def __call__(self, fn):
        config = autotune.active_override()
        assert config is not None, "the tuner must force the candidate while timing it"
        self.calls.append(config)
        cost = self.costs.get(config, self.default)
        if isinstance(cost, Exception):
            raise cost
        return cost


@pytest.fixture
def fake_gpu(monkeypatch):
    """Lookup logic as on a GPU: not interpreted, a fixed device identity, a fake timer."""
    timer = FakeTimer()

    class NoLaunch:
        # Kernels would run on CPU tensors here, which only the interpreter can do: forbid launches so
        # these tests behave the same on a GPU machine.
        def __getitem__(self, grid):
            raise AssertionError("no kernel launch expected with the simulated GPU")

    monkeypatch.setattr(quantize_module._launch_quantize, "kernel", NoLaunch())
    monkeypatch.setattr(dequantize_module._launch_dequantize, "kernel", NoLaunch())
    monkeypatch.setattr(launch_module, "DIRECT_LAUNCH", False)  # (on a GPU: no kernel compiled earlier either)
    monkeypatch.setattr(autotune, "is_interpreted", lambda: False)
    monkeypatch.setattr(autotune, "device_identity", lambda device: H200)
    monkeypatch.setattr(autotune, "benchmark", timer)
    return timer


def n_groups_of(n, group=GROUP):
    return -(-n // group)


def big(n=4**9, dtype=torch.float32):
    # Only the size, dtype and device matter to the lookup; nothing is launched in these tests.
    return torch.empty(n, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, bucket", [(1, 0), (4, 1), (5, 2), (16, 2), (17, 3), (4**8, 8), (4**8 + 1, 9), (4**13, 13), (2**40, 13)]
)
def test_size_bucket_is_ceil_log4_clamped(n, bucket):
    assert autotune.size_bucket(n) == bucket
    assert autotune.bucket_elements(autotune.size_bucket(n)) >= min(n, 4**autotune.MAX_TUNED_BUCKET)


def test_key_includes_gpu_name_capability_and_triton_version(monkeypatch):
    import triton

    monkeypatch.setattr(autotune, "device_identity", lambda device: H200)
    key = autotune.make_key("quantize", CPU, torch.bfloat16, 4**10, 4, GROUP, sigma=True, stochastic=True)
    assert key == TuneKey("NVIDIA H200", (9, 0), triton.__version__, "quantize", 4, GROUP, True, True, "bf16", 10)
    # Dequantize does not depend on the scheme or the rounding.
    deq = autotune.make_key("dequantize", CPU, torch.float16, 4**10, 4, GROUP, sigma=True, stochastic=True)
    assert (deq.sigma, deq.stochastic, deq.dtype) == (False, False, "fp16")

    autotune.reset()  # forget the cached identity, as a new process on another GPU would
    monkeypatch.setattr(autotune, "device_identity", lambda device: A100)
    other = autotune.make_key("quantize", CPU, torch.bfloat16, 4**10, 4, GROUP, sigma=True, stochastic=True)
    assert (other.gpu, other.capability) == A100
    assert other != key


def test_each_gpu_gets_its_own_tuned_entry(fake_gpu, monkeypatch, isolated_cache):
    x = big()
    autotune.quantize_launch_config(x, n_groups_of(x.numel()), 4, GROUP, False, False)
    calls_h200 = len(fake_gpu.calls)
    assert calls_h200 == len(autotune.candidate_configs(n_groups_of(4**9), GROUP, interpreted=False, pipelined=True))

    autotune.reset()
    monkeypatch.setattr(autotune, "device_identity", lambda device: A100)
    autotune.quantize_launch_config(x, n_groups_of(x.numel()), 4, GROUP, False, False)
    assert len(fake_gpu.calls) == 2 * calls_h200, "another GPU must be tuned again, not served the H200's entry"

    saved = autotune.read_cache()
    assert {(k.gpu, k.capability) for k in saved} == {H200, A100}


# ---------------------------------------------------------------------------------------------
# choosing a config
# ---------------------------------------------------------------------------------------------


def test_candidates_start_with_the_heuristic_and_are_distinct():
    n_groups = n_groups_of(4**10)
    configs = autotune.candidate_configs(n_groups, GROUP, interpreted=False)
    assert configs[0] == LaunchConfig(*default_group_tile(n_groups, GROUP, interpreted=False))
    assert len(configs) == len(set(configs)) > 3
    for config in configs:
        assert config.rows & (config.rows - 1) == 0
        assert config.num_warps in autotune.VALID_NUM_WARPS
    # Few groups: rows never exceed the next power of two of the group count, duplicates merge.
    small = autotune.candidate_configs(3, 1024, interpreted=False)
    assert all(c.rows <= 4 for c in small) and len(small) == len(set(small))
    assert all(config.tiles == 1 for config in configs + small)


def test_quantize_also_times_pipelined_tiles_where_a_program_can_take_several():
    n_groups = n_groups_of(4**10)
    plain = autotune.candidate_configs(n_groups, GROUP, interpreted=False)
    configs = autotune.candidate_configs(n_groups, GROUP, interpreted=False, pipelined=True)
    assert configs[:len(plain)] == plain
    assert configs[len(plain):] == [LaunchConfig(tile // GROUP, num_warps, autotune.PIPELINED_TILES)
                                    for tile, num_warps in autotune.PIPELINED_CANDIDATE_TILES]
    # 8 groups: too few for 4 tiles of 2 or more a program.
    few = autotune.candidate_configs(8, GROUP, interpreted=False, pipelined=True)
    assert few == autotune.candidate_configs(8, GROUP, interpreted=False)
    assert autotune.candidate_configs(n_groups, GROUP, interpreted=True, pipelined=True) == [
        autotune.interpreter_config(n_groups, GROUP)]


def test_tuning_picks_the_fastest_config(fake_gpu):
    n_groups = n_groups_of(4**9)
    candidates = autotune.candidate_configs(n_groups, GROUP, interpreted=False)
    heuristic = candidates[0]
    fastest = candidates[-2]  # anything but the heuristic
    fake_gpu.costs = {c: 1.0 + 0.1 * i for i, c in enumerate(candidates)}
    fake_gpu.costs[fastest] = 0.25
    key = autotune.make_key("quantize", CPU, torch.float32, 4**9, 4, GROUP)
    result = autotune.tune(key, CPU, timer=fake_gpu, candidates=candidates)
    assert result.entry.config == fastest
    assert result.entry.ms == 0.25
    assert result.entry.heuristic_ms == fake_gpu.costs[heuristic]
    assert sorted(fake_gpu.calls) == sorted(candidates), "every candidate is timed once"
    assert result.source == "tuned"


def test_ties_keep_the_heuristic_and_failing_candidates_are_skipped(fake_gpu):
    candidates = autotune.candidate_configs(n_groups_of(4**9), GROUP, interpreted=False)
    fake_gpu.costs = {candidates[1]: RuntimeError("out of resources"), candidates[2]: float("nan"),
                      candidates[3]: 0.0, candidates[4]: -1.0}
    key = autotune.make_key("quantize", CPU, torch.float32, 4**9, 4, GROUP)
    result = autotune.tune(key, CPU, timer=fake_gpu, candidates=candidates)
    assert result.entry.config == candidates[0], "equal times keep the heuristic; broken times never win"
    assert [result.timings[c] for c in candidates[1:5]] == [float("inf")] * 4
    fake_gpu.costs = {candidates[0]: float("nan"), candidates[5]: 2.0}
    fake_gpu.default = 3.0
    result = autotune.tune(key, CPU, timer=fake_gpu, candidates=candidates)
    assert (result.entry.config, result.entry.heuristic_ms) == (candidates[5], None)


def test_small_buckets_are_timed_from_a_cuda_graph_on_buffers_of_their_own(fake_gpu, monkeypatch):
    # On CUDA, buckets up to GRAPH_TIMED_MAX_BUCKET; CPU tensors here, the GPU's parts stood in for.
    cuda = torch.device("cuda", 0)
    assert autotune.timed_from_a_graph(autotune.GRAPH_TIMED_MAX_BUCKET, cuda)
    assert not autotune.timed_from_a_graph(autotune.GRAPH_TIMED_MAX_BUCKET + 1, cuda)
    assert not autotune.timed_from_a_graph(autotune.MIN_TUNED_BUCKET, CPU)
    graph_calls = []

    def fake_graph_benchmark(calls):
        graph_calls.append((autotune.active_override(), calls))
        return 0.5

    monkeypatch.setattr(autotune, "timed_from_a_graph", lambda bucket, device: bucket <= 9)
    monkeypatch.setattr(autotune, "l2_cache_bytes", lambda device: 1 << 20)
    monkeypatch.setattr(autotune, "graph_benchmark", fake_graph_benchmark)
    key = autotune.make_key("quantize", CPU, torch.float32, 4**9, 4, GROUP)
    result = autotune.tune(key, CPU)
    assert fake_gpu.calls == [] and [config for config, _ in graph_calls] == list(result.timings)
    # 1 MiB of fp32 input and 136 KiB written a call: 4 calls read and write 4 x the (pretend) 1 MiB cache.
    calls = graph_calls[0][1]
    assert len(calls) == 4 and len({call.args[0].data_ptr() for call in calls}) == 4
    assert all(call.func is quantize_module.triton_quantize for call in calls)
    # A larger bucket is timed by do_bench, on one buffer set.
    key = autotune.make_key("dequantize", CPU, torch.float32, 4**10, 4, GROUP)
    graph_calls.clear()
    result = autotune.tune(key, CPU)
    assert graph_calls == [] and fake_gpu.calls == list(result.timings)


def test_do_bench_is_handed_the_callable_itself(monkeypatch):
    # benchmark(fn) is also the benchmarks' GPU timer (benchmarks/one_callable.py, bench_kernels.py); the
    # tuner's do_bench path times the first of its calls.
    import triton.testing

    ran = []

    def fake_do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        fn()
        return 0.5

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert autotune.benchmark(lambda: ran.append("benchmark")) == 0.5
    assert autotune._benchmark_first([lambda: ran.append("first"), lambda: ran.append("second")]) == 0.5
    assert ran == ["benchmark", "first"]


def test_a_graph_that_cannot_be_captured_is_timed_by_do_bench_instead(fake_gpu, monkeypatch):
    def failing_capture(calls):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(autotune, "graph_ms_per_call", failing_capture)
    monkeypatch.setattr(autotune, "_warned", set())
    with autotune.use_config((4, 1)):
        with pytest.warns(RuntimeWarning, match="could not time from a CUDA graph"):
            assert autotune.graph_benchmark([lambda: None]) == fake_gpu.default
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: not again
            assert autotune.graph_benchmark([lambda: None]) == fake_gpu.default
    assert fake_gpu.calls == [LaunchConfig(4, 1)] * 2


def test_hot_path_tunes_once_persists_and_then_only_looks_up(fake_gpu, monkeypatch, isolated_cache):
    candidates = autotune.candidate_configs(n_groups_of(4**10), GROUP, interpreted=False, pipelined=True)
    best = candidates[-1]
    assert best.tiles > 1, "a pipelined config is stored and found again"
    fake_gpu.costs = {best: 0.5}
    x = big(4**10, torch.bfloat16)
    n_groups = n_groups_of(x.numel())
    assert tuple(autotune.quantize_launch_config(x, n_groups, 2, GROUP, False, False)) == tuple(best)
    assert len(fake_gpu.calls) == len(candidates)

    path = autotune.cache_path()
    assert path == isolated_cache / f"autotune-{autotune.FORMAT_VERSION}.json"
    document = json.loads(path.read_text())
    assert document["format"] == autotune.FORMAT_VERSION
    [entry] = document["entries"]
    assert (entry["gpu"], entry["kind"], entry["bits"], entry["dtype"], entry["bucket"]) == (
        "NVIDIA H200", "quantize", 2, "bf16", 10)
    assert (entry["rows"], entry["num_warps"], entry["tiles"], entry["ms"]) == (*best, 0.5)

    # Later launches of the same key: no timing, no file access, same answer (a smaller tensor of the
    # same bucket too, with rows capped to its group count).
    def no_file(*args, **kwargs):
        raise AssertionError("a cached key must not touch the cache file")

    monkeypatch.setattr(autotune, "read_cache", no_file)
    monkeypatch.setattr(autotune, "save_entries", no_file)
    for _ in range(3):
        assert tuple(autotune.quantize_launch_config(x, n_groups, 2, GROUP, False, False)) == tuple(best)
    smaller = big(4**9 + 1, torch.bfloat16)
    config = autotune.quantize_launch_config(smaller, n_groups_of(smaller.numel()), 2, GROUP, False, False)
    assert config == (min(best.rows, 2 ** (n_groups_of(smaller.numel()) - 1).bit_length()), best.num_warps, best.tiles)
    assert len(fake_gpu.calls) == len(candidates)


def test_standardized_launches_use_the_untuned_tile_and_time_nothing(fake_gpu, isolated_cache):
    x = big(4**10, torch.bfloat16)
    n_groups = n_groups_of(x.numel())
    heuristic = autotune.heuristic_config(n_groups, GROUP)
    assert tuple(autotune.quantize_launch_config(x, n_groups, 2, GROUP, False, False, standardize=True)) == tuple(
        heuristic)
    assert tuple(autotune.dequantize_launch_config(x, n_groups, 2, GROUP, standardize=True)) == heuristic[:2]
    assert fake_gpu.calls == [] and autotune.read_cache() == {}
    # The same key unstandardized is tuned as ever: the check above could have failed.
    autotune.quantize_launch_config(x, n_groups, 2, GROUP, False, False)
    assert fake_gpu.calls


def test_second_process_reads_the_cache_instead_of_tuning(fake_gpu, isolated_cache):
    candidates = autotune.candidate_configs(n_groups_of(4**9), GROUP, interpreted=False)
    fake_gpu.costs = {candidates[2]: 0.1}
    out = big(4**9, torch.float16)
    assert tuple(autotune.dequantize_launch_config(out, n_groups_of(out.numel()), 8, GROUP)) == candidates[2][:2]

    script = textwrap.dedent("""
        import sys, torch
        from tritonquant.kernels import autotune
        def no_timing(fn):
            raise SystemExit("tuned again")
        autotune.is_interpreted = lambda: False
        autotune.device_identity = lambda device: ("NVIDIA H200", (9, 0))
        autotune.benchmark = no_timing
        out = torch.empty(4**9, dtype=torch.float16)
        print(tuple(autotune.dequantize_launch_config(out, -(-out.numel() // 256), 8, 256)))
    """)
    env = dict(os.environ, **{autotune.ENV_CACHE_DIR: str(isolated_cache)})
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tuple(candidates[2][:2]))


def test_autotune_off_uses_the_heuristic_without_timing(fake_gpu, monkeypatch, isolated_cache):
    x = big()
    n_groups = n_groups_of(x.numel())
    for value in ("0", "off", "False"):
        monkeypatch.setenv(autotune.ENV_AUTOTUNE, value)
        config = autotune.quantize_launch_config(x, n_groups, 4, GROUP, False, False)
        assert config == (*default_group_tile(n_groups, GROUP, interpreted=False), 1)
    assert fake_gpu.calls == []
    assert not autotune.cache_path().exists()
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    autotune.quantize_launch_config(x, n_groups, 4, GROUP, False, False)
    assert fake_gpu.calls, "TRITONQUANT_AUTOTUNE=1 tunes"


def test_small_tensors_use_the_heuristic_without_timing(fake_gpu):
    x = big(4 ** (autotune.MIN_TUNED_BUCKET - 1))
    n_groups = n_groups_of(x.numel())
    assert autotune.quantize_launch_config(x, n_groups, 4, GROUP, False, False) == (
        *default_group_tile(n_groups, GROUP, interpreted=False), 1)
    assert fake_gpu.calls == []


def test_interpreter_collapses_to_one_config_without_timing(monkeypatch, isolated_cache):
    monkeypatch.setattr(autotune, "is_interpreted", lambda: True)

    def no_timing(fn):
        raise AssertionError("nothing is timed under the interpreter")

    monkeypatch.setattr(autotune, "benchmark", no_timing)
    n_groups = n_groups_of(4**10)
    candidates = autotune.candidate_configs(n_groups, GROUP)
    assert candidates == [autotune.interpreter_config(n_groups, GROUP)]
    assert candidates[0].rows * GROUP == 1 << 16, "the interpreter's large tile"
    x = big(4**10)
    assert tuple(autotune.quantize_launch_config(x, n_groups, 4, GROUP, True, True)) == tuple(candidates[0])
    key = autotune.make_key("quantize", CPU, torch.float32, 4**10, 4, GROUP)
    result = autotune.get_or_tune(key, CPU)
    assert (result.source, result.entry.config, result.entry.ms) == ("single", candidates[0], None)
    assert not autotune.cache_path().exists()


def test_failed_tuning_falls_back_to_the_heuristic_in_memory_only(fake_gpu, isolated_cache):
    fake_gpu.default = RuntimeError("no device")
    x = big()
    n_groups = n_groups_of(x.numel())
    with pytest.warns(RuntimeWarning, match="autotuning"):
        config = autotune.quantize_launch_config(x, n_groups, 4, GROUP, False, False)
    assert config == (*default_group_tile(n_groups, GROUP, interpreted=False), 1)
    calls = len(fake_gpu.calls)
    autotune.quantize_launch_config(x, n_groups, 4, GROUP, False, False)
    assert len(fake_gpu.calls) == calls, "a failed key is not retried on every launch"
    assert not autotune.cache_path().exists(), "a fallback is not persisted"


def test_a_launch_inside_a_cuda_graph_capture_uses_the_heuristic_and_tunes_later(monkeypatch):
    # Timing candidates synchronizes, which a CUDA graph capture forbids: a key first launched while
    # capturing gets the heuristic, remembered nowhere, and is tuned at its first launch outside a capture.
    monkeypatch.setattr(autotune, "device_identity", lambda device: H200)
    tuned = []
    monkeypatch.setattr(autotune, "_tune_and_store", lambda key, device: tuned.append(key) or autotune.TuneResult(
        key, autotune.CacheEntry(LaunchConfig(8, 2), 0.1), "tuned", {}))
    cuda = torch.device("cuda")  # (only named here: nothing is allocated or launched)
    key = autotune.make_key("quantize", cuda, torch.bfloat16, 4**10, 4, GROUP)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    entry = autotune._resolve_miss(key, cuda)
    assert entry.config == autotune.heuristic_config(n_groups_of(4**10), GROUP) and entry.ms is None
    assert tuned == [] and key not in autotune._entries
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert autotune._resolve_miss(key, cuda).config == LaunchConfig(8, 2)
    assert tuned == [key]


def test_a_tuned_tile_is_capped_to_a_smaller_tensors_groups(fake_gpu):
    # A cached config of a bucket serves every size in it. One with more rows than a tensor of that
    # bucket has groups (a large tile from the cache file) is launched with rows cut to the groups.
    x = big(4**7 + 1)  # bucket 8: 65 groups of 256
    key = autotune.make_key("quantize", x.device, x.dtype, x.numel(), 4, GROUP)
    autotune._entries[key] = autotune.CacheEntry(LaunchConfig(4096, 4), 0.1)
    assert autotune.quantize_launch_config(x, n_groups_of(x.numel()), 4, GROUP, False, False) == (128, 4, 1)
    assert fake_gpu.calls == []


# ---------------------------------------------------------------------------------------------
# forced configs and identical bytes
# ---------------------------------------------------------------------------------------------


def test_use_config_is_checked_nested_and_per_thread():
    with pytest.raises(ValueError):
        with autotune.use_config((3, 4)):
            pass
    with pytest.raises(ValueError):
        with autotune.use_config((4, 3)):
            pass
    for tiles in (0, 2.0, True):
        with pytest.raises(ValueError, match="tiles"):
            with autotune.use_config((4, 2, tiles)):
                pass
    seen = []
    with autotune.use_config((4, 2)):
        with autotune.use_config((8, 8, 4)):
            assert autotune.active_override() == (8, 8, 4)
        assert autotune.active_override() == (4, 2, 1)
        worker = threading.Thread(target=lambda: seen.append(autotune.active_override()))
        worker.start()
        worker.join()
    assert autotune.active_override() is None
    assert seen == [None], "a forced config belongs to its thread"


def test_config_generation_changes_when_configs_may_have_and_is_none_while_forced(fake_gpu, isolated_cache):
    # (What callers that remember a config across calls check: kernels' prepare_quantize and quantize_prepared.)
    first = autotune.config_generation()
    assert first is not None
    with autotune.use_config((4, 2)):
        assert autotune.config_generation() is None, "a forced config must not be remembered"
    assert autotune.config_generation() == first
    key = autotune.make_key("quantize", CPU, torch.float32, 4**9, 4, GROUP)
    autotune.get_or_tune(key, CPU)
    tuned = autotune.config_generation()
    assert tuned != first, "a tuning that landed may change a config"
    autotune.get_or_tune(key, CPU)
    assert autotune.config_generation() == tuned, "a cached entry changes nothing"
    autotune.reset()
    assert autotune.config_generation() not in (first, tuned)


class KernelSpy:
    """Wraps a jitted kernel to record the ROWS and num_warps each launch really used (and the SPLIT of
    each quantize launch, in ``splits``)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []
        self.splits = []
        self.tiles = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((kwargs["ROWS"], kwargs["num_warps"], grid))
            self.tiles.append(kwargs.get("TILES", 1))
            if "SPLIT" in kwargs:
                self.splits.append(kwargs["SPLIT"])
            return self.kernel[grid](*args, **kwargs)

        return launch


# (16, 2) has 8 rows a warp: its rows are shared by 4 threads, the others' by 8 (quantize.threads_per_group).
# The last three pipeline quantize (tiles a program: 4, 3 and 2); dequantize takes one tile a program.
FORCED = [LaunchConfig(1, 1), LaunchConfig(4, 2), LaunchConfig(16, 2), LaunchConfig(32, 8),
          LaunchConfig(1, 1, 4), LaunchConfig(4, 2, 3), LaunchConfig(16, 2, 2)]


@pytest.mark.parametrize(
    "bits, sigma, stochastic", [(1, False, False), (2, True, False), (4, False, True), (8, True, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forced_configs_give_identical_bytes(bits, sigma, stochastic, dtype, device, monkeypatch):
    group, n = 64, 64 * 37 + 13  # a partial last group; 38 groups do not fill the last tile
    x = activation_like(n, dtype, group, seed=bits, device=device)
    spy = KernelSpy(quantize_module._quantize_kernel)
    monkeypatch.setattr(quantize_module._launch_quantize, "kernel", spy)
    decode_spy = KernelSpy(dequantize_module._dequantize_kernel)
    monkeypatch.setattr(dequantize_module._launch_dequantize, "kernel", decode_spy)
    monkeypatch.setattr(launch_module, "DIRECT_LAUNCH", False)  # every launch through the spies
    outputs = []
    for config in FORCED:
        with autotune.use_config(config):
            payload, meta = triton_quantize(x, bits, group, sigma, stochastic, 7, 3)
            out = torch.full((n,), float("nan"), dtype=dtype, device=device)
            triton_dequantize(payload, meta, out, bits, group)
        outputs.append((payload, meta, out))
    assert [launch[:2] for launch in spy.launches] == [c[:2] for c in FORCED], "the forced tile reached the kernel"
    assert spy.tiles == [c.tiles for c in FORCED]
    # 38 groups: a program for every rows * tiles of them.
    assert [launch[2] for launch in spy.launches] == [(38,), (10,), (3,), (2,), (10,), (4,), (2,)]
    # A group of 64 is one chunk of 8 threads' vectors (2 for fp32), and two of 4 threads' (4 for fp32).
    assert spy.splits == ([1, 1, 2, 1, 1, 1, 2] if dtype == torch.bfloat16 else [2, 2, 4, 2, 2, 2, 4])
    assert [launch[:2] for launch in decode_spy.launches] == [c[:2] for c in FORCED]
    assert [launch[2] for launch in decode_spy.launches] == [(38,), (10,), (3,), (2,), (38,), (10,), (3,)]
    reference_payload, reference_meta = torch_quantize(x, bits, group, sigma, stochastic, 7, 3)
    reference_out = torch.empty(n, dtype=dtype, device=device)
    torch_dequantize(reference_payload, reference_meta, reference_out, bits, group)
    # Identical bits, signed zeros included: the kernels store base = +0.0 whichever zero min/max
    # returned (the interpreter's max(-0.0, 0.0) depends on the tile's shape).
    as_int = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for payload, meta, out in outputs:
        assert torch.equal(payload, reference_payload)
        assert torch.equal(meta.view(torch.int32), reference_meta.view(torch.int32))
        assert torch.equal(out.view(as_int), reference_out.view(as_int))


# ---------------------------------------------------------------------------------------------
# the cache file
# ---------------------------------------------------------------------------------------------


def test_cache_location_env_vars(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "override"))
    assert autotune.cache_path() == tmp_path / "override" / f"autotune-{autotune.FORMAT_VERSION}.json"
    monkeypatch.delenv(autotune.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "tritonquant" / f"autotune-{autotune.FORMAT_VERSION}.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says to ignore relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    name = f"autotune-{autotune.FORMAT_VERSION}.json"
    assert autotune.cache_path() == tmp_path / "home" / ".cache" / "tritonquant" / name


def one_entry(rows=4, bits=4, gpu="NVIDIA H200"):
    key = TuneKey(gpu, (9, 0), "3.6.0", "quantize", bits, GROUP, False, False, "bf16", 10)
    return key, autotune.CacheEntry(LaunchConfig(rows, 8), 0.02, 0.03)


def assert_valid_cache_holding(key, path):
    document = json.loads(path.read_text())
    assert document["format"] == autotune.FORMAT_VERSION
    assert key in autotune.read_cache(path)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == [], "no temp files left behind"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"format": 1, "entries": {"a": 1}}',
     b'{"format": 0, "entries": []}', b'{"format": 99, "entries": []}', b'{"entries": []}'],
    ids=["truncated", "empty", "binary", "list", "entries-not-list", "old-format", "new-format", "no-format"],
)
def test_corrupt_or_stale_cache_is_ignored_and_rewritten(content, fake_gpu, isolated_cache):
    isolated_cache.mkdir(parents=True)
    path = autotune.cache_path()
    path.write_bytes(content)
    assert autotune.read_cache() == {}
    x = big()
    autotune.quantize_launch_config(x, n_groups_of(x.numel()), 4, GROUP, False, False)
    assert fake_gpu.calls, "nothing usable was cached, so the key is tuned"
    key = autotune.make_key("quantize", CPU, torch.float32, x.numel(), 4, GROUP)
    assert_valid_cache_holding(key, path)


def test_stale_format_entries_are_not_used(fake_gpu, isolated_cache):
    key, entry = one_entry()
    autotune.save_entries({key: entry})
    path = autotune.cache_path()
    document = json.loads(path.read_text())
    document["format"] = autotune.FORMAT_VERSION + 1
    path.write_text(json.dumps(document))
    assert autotune.read_cache() == {}


def test_malformed_entries_are_dropped_one_by_one(isolated_cache):
    key, entry = one_entry()
    autotune.save_entries({key: entry})
    path = autotune.cache_path()
    document = json.loads(path.read_text())
    good = document["entries"][0]
    bad = [dict(good, rows=3), dict(good, rows=0), dict(good, rows=2 * autotune.MAX_TILE_ELEMENTS // GROUP),
           dict(good, bits="4"), dict(good, num_warps=5), dict(good, kind="pack"), dict(good, capability=[9]),
           dict(good, ms="fast"), dict(good, kind="dequantize", sigma=True),
           {k: v for k, v in good.items() if k != "gpu"}, "not an entry"]
    # (After the good entry: one of its key that were kept would replace it.) A rows of 3 or a tile past
    # Triton's largest block would fail to compile at the first launch.
    document["entries"] = [good] + bad
    path.write_text(json.dumps(document))
    assert autotune.read_cache() == {key: entry}


def test_unwritable_cache_dir_warns_once_and_keeps_configs_in_memory(fake_gpu, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(blocker / "cache"))  # mkdir fails even as root
    x = big()
    n_groups = n_groups_of(x.numel())
    with pytest.warns(RuntimeWarning, match="cannot write"):
        first = autotune.quantize_launch_config(x, n_groups, 4, GROUP, False, False)
    calls = len(fake_gpu.calls)
    assert tuple(autotune.quantize_launch_config(x, n_groups, 4, GROUP, False, False)) == tuple(first)
    assert len(fake_gpu.calls) == calls
    key, entry = one_entry()
    assert autotune.save_entries({key: entry}) is False


def test_a_file_system_without_locks_still_gets_the_cache_written(isolated_cache, monkeypatch):
    # flock fails with ENOLCK on some NFS homes: the lock is best effort, the write is still atomic.
    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    key, entry = one_entry()
    assert autotune.save_entries({key: entry}) is True
    assert autotune.read_cache() == {key: entry}


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tritonquant.kernels import autotune
    name, count, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    for i in range(count):
        key = autotune.TuneKey(name, (9, 0), "3.6.0", "quantize", 4, 256, False, False, "bf16", i % 14)
        key = key._replace(bits=(1, 2, 4, 8)[i // 14 % 4], group_size=2 ** (3 + i // 56))
        assert autotune.save_entries({key: autotune.CacheEntry(autotune.LaunchConfig(4, 8), 0.01 + i, None)})
""")


def writer_keys(name, count):
    keys = set()
    for i in range(count):
        key = TuneKey(name, (9, 0), "3.6.0", "quantize", 4, 256, False, False, "bf16", i % 14)
        keys.add(key._replace(bits=(1, 2, 4, 8)[i // 14 % 4], group_size=2 ** (3 + i // 56)))
    return keys


def test_concurrent_writers_leave_a_valid_file_with_every_entry(isolated_cache, tmp_path):
    count = 40
    go = tmp_path / "go"
    env = dict(os.environ, **{autotune.ENV_CACHE_DIR: str(isolated_cache)})
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, f"proc{i}", str(count), str(go)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()

    errors = []
    done = threading.Event()

    def thread_writer(name):
        try:
            for key in sorted(writer_keys(name, count)):
                assert autotune.save_entries({key: autotune.CacheEntry(LaunchConfig(2, 4), 0.5, None)})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        path = autotune.cache_path()
        while not done.is_set():
            if path.exists():
                try:
                    document = json.loads(path.read_text())
                    assert document["format"] == autotune.FORMAT_VERSION
                except Exception as exc:  # noqa: BLE001 - a torn read would land here
                    errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(f"thread{i}",)) for i in range(3)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    go.touch()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    done.set()
    watcher.join()
    assert errors == []
    expected = set().union(*(writer_keys(f"proc{i}", count) for i in range(2)),
                           *(writer_keys(f"thread{i}", count) for i in range(3)))
    saved = autotune.read_cache()
    assert set(saved) == expected
    assert_valid_cache_holding(next(iter(expected)), autotune.cache_path())


# ---------------------------------------------------------------------------------------------
# on a real GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["quantize", "dequantize"])
def test_real_tuning_on_the_gpu(kind, isolated_cache):
    device = torch.device("cuda", torch.cuda.current_device())
    n = 4**autotune.MIN_TUNED_BUCKET
    key = autotune.make_key(kind, device, torch.bfloat16, n, 4, GROUP)
    assert key.gpu == torch.cuda.get_device_name(device)
    rng_state = torch.cuda.get_rng_state(device)
    graphs = []
    timed = autotune.graph_ms_per_call
    autotune.graph_ms_per_call = lambda calls: graphs.append(len(calls)) or timed(calls)
    try:
        result = autotune.get_or_tune(key, device)
    finally:
        autotune.graph_ms_per_call = timed
    assert result.source == "tuned"
    # The smallest tuned bucket is timed from CUDA graphs, each candidate on many buffer sets.
    assert len(graphs) == len(result.timings) and min(graphs) > 1
    assert result.entry.config in autotune.candidate_configs(n_groups_of(n), GROUP, pipelined=kind == "quantize")
    assert 0 < result.entry.ms <= min(result.timings.values()) + 1e-9
    assert torch.equal(torch.cuda.get_rng_state(device), rng_state), "tuning leaves torch's RNG alone"
    assert key in autotune.read_cache()
    autotune.reset()
    assert autotune.get_or_tune(key, device).source == "cached"
    # The hot path serves the same key from memory.
    x = torch.randn(n, device=device).to(torch.bfloat16)
    if kind == "quantize":
        config = autotune.quantize_launch_config(x, n_groups_of(n), 4, GROUP, False, False)
    else:
        config = autotune.dequantize_launch_config(x, n_groups_of(n), 4, GROUP)
    # (Dequantize's config leaves out the tiles a program: always one.)
    assert tuple(config) == tuple(result.entry.config)[:len(config)]
