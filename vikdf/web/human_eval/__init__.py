"""Human evaluation of dialogue systems as in the paper (§4.4, §5.2, Table 2), on a real database:

    python -m vikdf.web.human_eval create --predictions runs/a/predictions.jsonl runs/b/predictions.jsonl \
        --systems "VIKDF,Llama-2" --sample 100 --seed 0 --annotators 3 --db study.sqlite
    python -m vikdf.web.human_eval serve --db study.sqlite --port 8000
    python -m vikdf.web.human_eval report --db study.sqlite --output_dir runs/human-eval

`study` holds the SQLite study, `server` the annotation page, `report` the means and Fleiss' κ.
"""

from vikdf.web.human_eval.report import build_report, fleiss, report_markdown, summarise
from vikdf.web.human_eval.server import create_annotation_app
from vikdf.web.human_eval.study import CRITERIA, create_study, login_link

__all__ = ["CRITERIA", "create_study", "login_link", "create_annotation_app", "build_report", "fleiss",
           "report_markdown", "summarise"]
