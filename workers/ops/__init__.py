"""Operating a fleet: the operator's commands (``cli``, ``dead``, ``roles``), the local fleet
of ``actionfleet up`` (``fleet``), the demo, Prometheus metrics and Flower.
May import anything below it (``producer``, ``sandboxes``, ``audit``, ``workers.config``,
``workers.guarantees``, ``workers.executors``); the pipeline imports only ``metrics``."""
