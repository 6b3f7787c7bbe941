"""Evaluation (paper §4.4, §5): generation and the Table-1 metrics across one or many processes, aggregation and
significance over runs, the knowledge ablation, textualised knowledge (§5.4) and Hub model cards."""
