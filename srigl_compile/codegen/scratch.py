"""Old home of ``runtime.scratch``: this name is the same module object (so that patching an attribute here
patches the buffers' own module), kept for ``srigl_compile.__init__`` and code written before the runtime split."""

import sys

from ..runtime import scratch as _scratch

sys.modules[__name__] = _scratch
