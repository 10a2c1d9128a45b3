"""What an agent imports: the action contract (``models``, ``validation``), ``ActionClient``
(``client``), the error tree (``errors``), how to reach a fleet (``config``, ``transport``)
and the agent's commands (``cli``: submit, batch, schema).

Imports nothing of ``workers``, ``sandboxes`` or ``audit`` (tests/test_layout.py checks it,
and that a base install without extras runs it): every other package may import this one.
"""
