"""`onestep bench`: teacher rows and run rows under one protocol, forgetting metrics, Markdown and chart."""

from onestep.bench.compare import markdown_table, run_benchmark
from tests.conftest import bench_run


def test_benchmark_rows_forgetting_and_outputs(tmp_path):
    run = bench_run(tmp_path / "run")
    report = run_benchmark([run], tmp_path / "bench", num_samples=40, teacher_steps=[2], speed_batch=8,
                           seeds=[0, 1], forget=[0])
    names = [r["name"] for r in report["rows"]]
    assert names == ["teacher DDIM 2", "sid (run)"]
    for row in report["rows"]:
        assert len(row["fds"]) == 2 and row["fd"] > 0 and row["images_per_s"] > 0
        f = row["forgetting"]
        assert f["samples_per_forgotten_class"] == 4
        assert f["unlearning_accuracy/class_0"] + f["classified_as_forgotten/class_0"] == 1.0
        judges = row["judges"]
        assert list(judges) == ["digits", "digits_mlp"] and judges["digits"]["fd"] == row["fd"]
        assert judges["digits_mlp"]["protocol"]["metric"] == "FD-digits_mlp" and len(judges["digits_mlp"]["fds"]) == 2
        assert judges["digits_mlp"]["fd"] != row["fd"]
        f2 = judges["digits_mlp"]["forgetting"]
        assert f2["unlearning_accuracy/class_0"] + f2["classified_as_forgotten/class_0"] == 1.0
        assert f2["fd_digits_mlp/remaining_classes"] > 0
    table = markdown_table(report)
    assert "| sid (run) | 1 |" in table and "classified as 0 when asked for 0, digits_mlp classifier" in table
    header = next(line for line in table.splitlines() if line.startswith("| sampler | NFE"))
    assert "| FD-digits ↓ | FD-digits_mlp ↓ |" in header
    assert "FD-digits_mlp remaining classes" in table
    student = next(line for line in table.splitlines() if line.startswith("| sid (run)"))
    assert f"{report['rows'][1]['judges']['digits_mlp']['fd']:.3f} ± " in student
    assert (tmp_path / "bench" / "fd_vs_step.png").stat().st_size > 0
