"""Test and demo doubles, in one place: a local HTTP server with faults
(`localserver`), the demo's images and metadata (`demo_data`), tiny random-weight models
in the released formats for scoring and grounding (`tiny_scoring`) and for the training
families (`tiny_train`, also behind the ``tiny:NAME`` model specs of the tiny configs),
and a multi-node Ray cluster on one machine (`local_cluster`). The demo and the tests
import them from here; product code only for ``tiny:`` specs and the demo."""
