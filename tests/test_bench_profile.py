"""scripts/bench_profile.py: the kernel-table arithmetic, and that every mode runs (on the CPU,
without PyTorch's profiler, which needs CUDA)."""
import pytest

from scripts import bench_profile


def test_busy_time_is_the_union_of_intervals():
    # overlapping kernels on two streams count once; gaps do not count
    assert bench_profile.busy_time([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert bench_profile.busy_time([]) == 0


def test_categories_of_real_kernel_names():
    cat = bench_profile.categorize
    assert cat("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention (cuDNN)"
    assert cat("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "matmul"
    assert cat("void mlx::core::cu::rms_norm_small<__nv_bfloat16, 64, 1, false, 8>(...)") == "reduction"
    assert cat("void mlx::core::cu::copy_gg_nd<__nv_bfloat16, __nv_bfloat16, int, 2, 4>(...)") == "copy / gather / scatter"
    assert cat("void mlx::core::cu::binary_vv<mlx::core::cu::Add, __nv_bfloat16>(...)") == "elementwise"


def test_summary_sums_per_run():
    kernels = [("gemm_a", 0, 4), ("copy_v", 4, 5), ("gemm_a", 10, 14), ("copy_v", 14, 15)]
    out = bench_profile.summarize(kernels, wall=0.020, repeats=2, top=5)
    assert out["kernels_per_run"] == 2 and out["gpu_busy_ms"] == pytest.approx(0.005)
    assert out["categories_ms"]["matmul"] == pytest.approx(0.004)
    assert out["top"][0] == {"name": "gemm_a", "ms": pytest.approx(0.004), "launches": 1}


@pytest.mark.parametrize("what", ["train", "optim", "decode", "attn"])
def test_every_mode_runs_without_the_profiler(what):
    res = bench_profile.main(["--what", what, "--no-torch", "--depth", "1", "--aspect-ratio", "64", "--head-dim", "32",
                              "--max-seq-len", "64", "--vocab-size", "128", "--device-batch-size", "2", "--window", "16",
                              "--mask", "banded", "--prompt-tokens", "8", "--warmup", "1", "--repeats", "1"])
    assert res["unprofiled_ms"] > 0 and res["what"] == what


def test_op_chain_applies_the_op_n_times():
    # the overhead benchmark is only right if a chain of n really runs the op n times
    import mlx.core as mx
    w = mx.array([[0.0, 1.0], [2.0, 0.0]])
    x = mx.array([[1.0, 1.0]])
    assert bench_profile.op_chain(lambda v: v @ w, 3)(x).tolist() == [[4.0, 2.0]]  # (1,1)->(2,1)->(2,2)->(4,2)
    assert bench_profile.op_chain(lambda v: v + 1, 36)(x).tolist() == [[37.0, 37.0]]


def test_kernel_overhead_is_the_time_difference_per_kernel():
    # the fixed cost of an eval cancels between the two chain lengths: what is left is per kernel.
    # Timings on a shared 2-core machine are noise at this size, so only the arithmetic is checked
    # here; the numbers themselves come from the benchmark (bench_profile --what overhead).
    res = bench_profile.kernel_overhead(width=64, lengths=(4, 36), repeats=2)
    assert set(res) == {"linear", "matmul", "rms_norm"}
    for name in res:
        chains = res[name]["ms_per_chain"]
        assert set(chains) == {"4", "36"} and min(chains.values()) > 0
        assert res[name]["us_per_kernel"] == pytest.approx((chains["36"] - chains["4"]) * 1e3 / 32)


def test_model_flags_give_nanochat_depth_config():
    # the benchmarks' model is GPTConfig.from_depth of their flags (aspect ratio, head dim, context, windows)
    import argparse
    from mlxchat.gpt import GPTConfig
    from scripts import _bench
    p = argparse.ArgumentParser()
    _bench.add_model_args(p)
    args = p.parse_args(["--depth", "3", "--aspect-ratio", "40", "--head-dim", "32", "--max-seq-len", "96",
                         "--window-pattern", "SL", "--vocab-size", "200"])
    config = _bench.model_config(args)
    assert config == GPTConfig.from_depth(3, vocab_size=200, aspect_ratio=40, head_dim=32, max_seq_len=96, window_pattern="SL")
    assert (config.n_embd, config.n_head, config.sequence_len) == (128, 4, 96)  # 3 x 40 = 120, up to whole heads of 32
    x, y = _bench.random_batch(argparse.Namespace(vocab_size=200, device_batch_size=2, max_seq_len=96))
    assert x.shape == y.shape == (2, 96) and (x[:, 1:] == y[:, :-1]).all().item()
