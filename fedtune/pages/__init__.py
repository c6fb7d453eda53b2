"""fedtune's live pages: a run's rounds, hospitals and curves in a browser, updating by themselves.

:mod:`~fedtune.pages.serve` is the one HTTP server behind every page (loopback by default;
another address only with TLS and a token), :mod:`~fedtune.pages.runview` turns a run
folder into the JSON the pages draw, and ``static/`` holds the HTML, JavaScript and CSS,
shipped inside the package: nothing is loaded from the internet.
"""
