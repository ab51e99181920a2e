"""``qwenquant bench``'s arguments are checked by value on any machine, before a GPU is asked for."""

import torch

from qwenquant.cli import main


def test_bench_e2e_refuses_unknown_modes_and_attention_by_name(capsys):
    assert main(["bench", "e2e", "--modes", "w4g128-fused,w4-turbo"]) == 2
    err = capsys.readouterr().err
    assert "unknown mode(s) ['w4-turbo']" in err and "w4g128-fused+head" in err
    assert main(["bench", "e2e", "--attend", "window"]) == 2
    assert "--attend 'window'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # valid names: then the GPU requirement, named
        assert main(["bench", "e2e", "--modes", "w4g128-fused"]) == 2
        assert "need CUDA" in capsys.readouterr().err
