"""The operators' console (`worker console`): a local web page over the CLI's own clients.

`backend.py` reads and acts (dead letters, the control channel, the results topic),
`app.py` serves the page and its JSON API, `static/` is the page.
"""
