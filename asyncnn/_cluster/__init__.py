"""Workers: actor graphs across processes (see ``asyncnn.cluster``)."""
