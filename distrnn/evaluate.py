"""The evaluation worker behind `distrnn evaluate` (`accelerate launch -m distrnn.evaluate`).

Exact train and test accuracy of a saved model, sharded across processes; the metric is
distrnn.evaluation.counting and the file format distrnn.run.model_files.
"""

from __future__ import annotations

import click

from distrnn.config.options import EVALUATE_OPTIONS, with_options
from distrnn.data.mnist import load_split
from distrnn.errors import CONTEXT_SETTINGS
from distrnn.evaluation.counting import exact_accuracy
from distrnn.ranks.collectives import agree, main_print, make_accelerator, run_worker, teardown
from distrnn.ranks.devices import will_run_on_cpu
from distrnn.run.model_files import load_model


@with_options(EVALUATE_OPTIONS)
@click.command(context_settings=CONTEXT_SETTINGS)
def main(checkpoint: str, data_dir: str | None, batch_size: int | None, limit: int | None,
         precision: str | None) -> None:
    """Print the exact train and test accuracy of a saved model, sharded across processes."""
    model, cfg = load_model(checkpoint)
    data_dir = data_dir or cfg.data.dir
    note = None
    if precision is None:
        precision = cfg.train.precision
        if precision == "fp16" and will_run_on_cpu():
            precision, note = "no", "note: the model was trained in fp16, which needs a GPU; evaluating in fp32"
    accelerator = None
    try:
        accelerator = make_accelerator(precision, cfg.train.seed, cfg.train.collective_timeout_s,
                                       project_dir=checkpoint)
        model = model.to(accelerator.device)
        say = main_print(accelerator)
        if note:
            say(note)
        for train, label in [(True, "training"), (False, "test")]:
            split = (agree(accelerator, lambda train=train: load_split(data_dir, train))
                     .first(limit).to(accelerator.device))
            accuracy = exact_accuracy(accelerator, model, split, batch_size or cfg.train.eval_batch_size)
            say(f"Accuracy on {label} data:")
            say(accuracy.report())
    finally:
        teardown(accelerator)


if __name__ == "__main__":
    run_worker(main, prog="distrnn.evaluate")
