"""What bfloat16 condensed values cost in accuracy and gain in time on the CPU, against float32 values.

    python benchmarks/bf16_values.py [--epochs 10] [--hidden 2048] [--out benchmarks/results]

Trains the demo's MLP (784-hidden-hidden-10) with SRigL at 90% on MNIST-5k, lowers it twice for llvm (float32
values; ``LlvmConfig(value_dtype=torch.bfloat16)``) and reports, on the test split: the relative error of the
bf16 model's logits against the float32 one (max over all logits / the largest logit, and the mean absolute error
/ the mean absolute logit), top-1 agreement between the two, both accuracies; and the median time of a forward at
batch 1 and 256 for each, side by side in this process. Writes ``bf16_values.json`` (machine, versions, command).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's spinning threads starve TVM's pool
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import TimerConfig, measure, save_results, set_threads  # noqa: E402

from srigl_compile import SRigLConfig, lower  # noqa: E402
from srigl_compile.codegen.backends import LlvmConfig  # noqa: E402
from srigl_compile.data import load_mnist  # noqa: E402
from srigl_compile.recipes import evaluate, train_classifier  # noqa: E402
from srigl_compile.zoo import mlp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    data = load_mnist()
    config = SRigLConfig(sparsity=0.9, gamma_sal=0.95)
    trained = train_classifier(mlp(data.input_shape, data.num_classes, args.hidden), data, config,
                               epochs=args.epochs).model.eval()
    lowered = {"float32": lower(trained, LlvmConfig(progress=False)),
               "bfloat16": lower(trained, LlvmConfig(value_dtype=torch.bfloat16, progress=False))}
    with torch.no_grad():
        f32, bf16 = (lowered[name](data.x_test) for name in ("float32", "bfloat16"))
    accuracy = {name: evaluate(model, data.x_test, data.y_test) for name, model in lowered.items()}
    quality = {"max_relative_error": float((bf16 - f32).abs().max() / f32.abs().max()),
               "mean_relative_error": float((bf16 - f32).abs().mean() / f32.abs().mean()),
               "top1_agreement": float((bf16.argmax(1) == f32.argmax(1)).float().mean()),
               "test_examples": len(data.y_test), "accuracy": accuracy}
    rows = []
    timer = TimerConfig(threads=args.threads)
    for batch in (1, 256):
        x = data.x_test[:batch]
        with torch.no_grad():
            times = {name: measure(lambda m=model: m(x), timer)["median"] for name, model in lowered.items()}
        rows.append({"batch": batch, **{f"{name}_us": us for name, us in times.items()},
                     "bf16_speedup": times["float32"] / times["bfloat16"]})
    print(f"bf16 values vs float32: max rel. error {quality['max_relative_error']:.2e}, mean "
          f"{quality['mean_relative_error']:.2e}, top-1 agreement {100 * quality['top1_agreement']:.2f}% of "
          f"{quality['test_examples']}; accuracy {100 * accuracy['float32']:.2f}% (f32) "
          f"{100 * accuracy['bfloat16']:.2f}% (bf16)")
    for row in rows:
        print(f"batch {row['batch']}: float32 {row['float32_us']:.1f} us, bfloat16 {row['bfloat16_us']:.1f} us "
              f"({row['bf16_speedup']:.2f}x)")
    path = save_results("bf16_values", rows, {"command": " ".join(sys.argv), "quality": quality,
                                              "epochs": args.epochs, "hidden": args.hidden}, args.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
