"""Training: config, the RL step, the loop around it, checkpoints, logging, warm-start.

``posttrain.train`` is also the documented entry point ``from posttrain import train``: the
package object is callable and runs ``posttrain.train.loop.train``. (Python binds a subpackage to
its parent's attribute of the same name once it is imported, so a plain function called ``train``
on ``posttrain`` would be replaced by this package; making the package callable keeps both.)
"""

import sys
import types
from typing import Any


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, config: Any, **kwargs: Any) -> Any:
        from posttrain.train.loop import train

        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage
