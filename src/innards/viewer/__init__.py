"""See inside: a local web viewer (``innards view``) and a static report (``innards report``) of innards runs.

``discover`` finds runs, ``pages`` turns each into JSON page data, ``server`` serves the single-page app in
``static/`` with that data (and the steering playground), ``report`` writes the same pages as files.
"""
