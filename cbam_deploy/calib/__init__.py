"""What every INT8 recipe shares (``recipes``: the result, the calibration cache, the gate checks around a
recipe). The recipes themselves are their formats' (``formats.Recipe``, in ``backends/<format>/``)."""
