"""The two small web pages: the chat page (`python -m vikdf.web.chat`) and the human-evaluation study
(`python -m vikdf.web.human_eval`), with what they share in `common`."""
