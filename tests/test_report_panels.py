"""`make report`'s picture and text: the text lists exactly the panels drawn, a panel's legend
stays short with distinct colours, and the aux loss gets its own axis."""

import json

import matplotlib.pyplot as plt

from stages import report


def records(steps: int, **keys) -> list[dict]:
    return [{"step": s, **{k: (v(s) if callable(v) else v) for k, v in keys.items()}} for s in range(1, steps + 1)]


def test_report_text_lists_exactly_the_panels_drawn(tmp_path):
    run = tmp_path / "rl"
    run.mkdir()
    recs = records(5, loss=lambda s: -0.1 * s, reward=0.2, accuracy=0.5, format_error_thinking=0.1,
                   format_error_non_thinking=0.0, clip_frac=0.01, lr=1e-5, step_s=2.0, mem_rss_gib=0.9)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    drawn = report.plot_rows([("rl", [("rl", recs)], False)], tmp_path / "check.png")
    text = report.write_report(run).read_text()
    listed = [line[2:].split(":")[0] for line in text.splitlines() if line.startswith("- ")]
    assert listed == [t.split(": ", 1)[1] for t in drawn], (listed, drawn)
    assert "RL rewards (all samples)" in listed and "throughput" not in listed and "expert load max/mean" not in listed


def test_a_chain_panel_has_a_short_legend_distinct_colours_and_aux_on_its_own_axis():
    stages = [(f"stage{i}", records(10, loss=5.0, lm_loss=4.0, mtp_loss=4.5, aux_loss=1e-3,
                                     router_max_load={"1": 2.0, "2": 3.0})) for i in range(4)]
    fig, ax = plt.subplots()
    report._draw_panel(ax, stages, ["loss", "lm_loss", "mtp_loss", "aux_loss"], concat=True)
    entries = ax.get_legend().get_texts()
    assert len(entries) <= 6, [t.get_text() for t in entries]
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel().startswith("aux loss")  # the right-hand axis
    assert max(line.get_ydata().max() for line in fig.axes[1].get_lines()) < 0.01  # aux is there, not on the left
    colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in ax.get_lines() if line.get_linestyle() == "-"}
    assert len(colours) == 3  # loss, LM, MTP: one colour each across the 4 stages
    plt.close(fig)
    fig, ax = plt.subplots()  # several runs on one axis: runs + keys, never runs x keys
    report._draw_panel(ax, stages[:3], ["loss", "lm_loss", "mtp_loss"], concat=False)
    assert len(ax.get_legend().get_texts()) == 6
    plt.close(fig)
