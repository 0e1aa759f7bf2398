"""The report's loss plot and training section with a validation split (training.validation)."""

from __future__ import annotations

from kubetune.results import TrainResult
from kubetune.schema import CheckpointRecord
from kubetune_trainer.report import Table, _training, loss_curve_png, validation_points

ROWS = [
    {"step": 10, "loss": 3.0, "lr": 1e-3},
    {"step": 20, "loss": 2.5, "lr": 1e-3, "validation_loss": 2.7},
    {"step": 30, "loss": 2.2, "lr": 5e-4},
    {"step": 40, "loss": 2.0, "lr": 1e-4, "validation_loss": 2.4},
    {"step": 50, "loss": 1.9, "validation_loss": float("nan")},
]


def test_validation_points_are_the_rows_with_a_finite_validation_loss() -> None:
    assert validation_points(ROWS) == [(20, 2.7), (40, 2.4)]
    assert validation_points([{"step": 1, "loss": 2.0}]) == []


def test_the_plot_draws_both_curves() -> None:
    with_validation = loss_curve_png(ROWS)
    without = loss_curve_png([{k: v for k, v in r.items() if k != "validation_loss"} for r in ROWS])
    assert with_validation is not None and with_validation.startswith(b"\x89PNG")
    assert without is not None and with_validation != without


def test_training_section_shows_the_best_step_and_the_checkpoints() -> None:
    train = TrainResult(
        steps=50,
        total_steps=100,
        epochs=0.5,
        model_uri="file:///r/model",
        validation_loss=2.5,
        best_validation_loss=2.4,
        best_step=40,
        model_step=40,
        stopped_early=True,
        checkpoints=[
            CheckpointRecord(step=40, loss=2.0, validation_loss=2.4, uri="file:///c/40", best=True),
            CheckpointRecord(step=50, loss=1.9, validation_loss=2.5, uri="file:///c/50"),
        ],
    )
    tables = [b for b in _training(train, None) if isinstance(b, Table)]
    summary = {row[0]: row[1] for row in tables[0].rows}
    assert summary["Best validation loss"] == "2.4000 at step 40"
    assert summary["Stopped early"] == "yes" and summary["Model saved from step"] == "40"
    assert [row[0] for row in tables[1].rows] == ["40", "50"] and tables[1].rows[0][3] == "yes"
