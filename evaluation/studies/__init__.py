"""Studies built on tasks and measurements: ``compare`` (:mod:`.compare`, rows and files in
:mod:`.report`), ``bench`` (:mod:`.bench`), ``sweep`` (:mod:`.sweep`) and ``plot`` (:mod:`.plot`)."""
