import subprocess
import sys

import pytest


def test_import_does_not_import_tvm_nor_initialise_cuda():
    code = (
        "import sys, srigl_compile, torch\n"
        "assert 'tvm' not in sys.modules, 'tvm imported'\n"
        "assert 'tvm_ffi' not in sys.modules, 'tvm_ffi imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'sklearn' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["sparsify", "SRigLUpdater", "SRigLConfig", "sparse_layers"])
def test_public_names(name):
    import srigl_compile

    assert name in srigl_compile.__all__ and hasattr(srigl_compile, name)
