"""`pdserve bench transfer --gpu-table --only`: which rows a selection runs."""

from __future__ import annotations

from pdserve.bench.transfer.gpu_table import gpu_rows, label_matches


def test_only_matches_a_part_of_a_label_or_with_a_dollar_the_whole_label():
    labels = [row.label for row in gpu_rows()]
    assert len(set(labels)) == len(labels)  # a label names one row
    assert [x for x in labels if label_matches(x, "CudaIpcConnector$")] == ["CudaIpcConnector"]
    assert [x for x in labels if label_matches(x, "NixlConnector$")] == ["NixlConnector"]
    prefixed = [x for x in labels if label_matches(x, "CudaIpcConnector")]
    assert len(prefixed) > 1 and all("CudaIpcConnector" in x for x in prefixed)
