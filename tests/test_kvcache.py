"""KV cache sizing: the formula, the seed's example, blocks that fit, and `tunebench kv-size`."""
import pytest

from tunebench.cli import main
from tunebench.runtime.kvcache import GIB, blocks_that_fit, dtype_name, human_bytes, kv_bytes_per_token, kv_size

SEED = dict(layers=32, kv_heads=8, head_dim=128)   # Llama-2-7B-like geometry from the seed


def test_seed_example_128_kib_per_token_half_gib_at_4096():
    assert kv_bytes_per_token(**SEED, dtype="float16") == 128 * 1024
    s = kv_size(**SEED, dtype="fp16", context=4096)
    assert s.total_bytes == 4096 * 128 * 1024 == GIB // 2
    assert human_bytes(s.bytes_per_token) == "128 KiB" and human_bytes(s.total_bytes) == "512 MiB"


@pytest.mark.parametrize("dtype, size", [("float16", 2), ("fp16", 2), ("bfloat16", 2), ("bf16", 2),
                                         ("float32", 4), ("fp32", 4)])
def test_bytes_per_token_is_2_layers_heads_dim_size(dtype, size):
    assert kv_bytes_per_token(3, 5, 7, dtype) == 2 * 3 * 5 * 7 * size


def test_torch_dtypes_are_accepted_by_name():
    import torch
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name("half") == "float16"
    assert kv_bytes_per_token(1, 1, 1, torch.float32) == 8


def test_batch_blocks_and_what_fits():
    s = kv_size(**SEED, dtype="bf16", context=1000, batch=3, memory_gib=1.0, block_size=16)
    assert s.tokens == 3000 and s.total_bytes == 3000 * 128 * 1024
    assert s.block_bytes == 16 * 128 * 1024 == 2 * 1024 * 1024
    assert s.blocks_per_sequence == 63                       # ceil(1000 / 16)
    assert s.blocks_fit == 512 and s.tokens_fit == 512 * 16  # 1 GiB / 2 MiB
    assert s.sequences_fit == 512 // 63
    assert blocks_that_fit(2 * 1024 * 1024 - 1, 128 * 1024, 16) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=0), "layers"), (dict(kv_heads=-1), "kv_heads"), (dict(head_dim=1.5), "head_dim"),
    (dict(context=0), "context"), (dict(batch=0), "batch"), (dict(block_size=0), "block_size"),
    (dict(dtype="int8"), "dtype"), (dict(memory_gib=0.0), "memory"), (dict(memory_gib=float("nan")), "memory"),
])
def test_invalid_arguments_name_themselves(kwargs, message):
    args = dict(SEED, dtype="fp16", context=4096, batch=1) | kwargs
    with pytest.raises(ValueError, match=message):
        kv_size(**args)


def test_cli_prints_per_token_total_and_blocks(capsys):
    rc = main(["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--dtype", "fp16",
               "--context", "4096", "--batch", "2", "--memory", "10", "--block-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "bytes per token: 131072 (128 KiB)" in out
    assert "8192 tokens: 1073741824 bytes (1 GiB)" in out
    assert "in 10 GiB: 5120 blocks fit = 81920 tokens = 20 sequences of 4096 tokens" in out


def test_cli_without_memory_prints_no_fit_line(capsys):
    assert main(["kv-size", "--layers", "1", "--kv-heads", "1", "--head-dim", "64", "--context", "10"]) == 0
    out = capsys.readouterr().out
    assert "bytes per token: 256 " in out and "blocks fit" not in out


def test_cli_rejects_nonpositive_values_clearly(capsys):
    rc = main(["kv-size", "--layers", "0", "--kv-heads", "8", "--head-dim", "128", "--context", "4096"])
    assert rc == 2
    assert "kv-size: error: layers must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["kv-size", "--layers", "1", "--kv-heads", "8", "--head-dim", "128", "--context", "4096",
                 "--memory", "-1"]) == 2
    assert "memory must be a positive number of GiB" in capsys.readouterr().err
