# diagnostic hack for a bench worktree: EDGESPEC_DIAG_NO_TREES=1 makes TreePolicy run chains only
import sys
p = sys.argv[1] + '/core/tree_policy.py'
s = open(p).read()
old = '''    def _speculative_rate(self, cost: CostModel, accept: Sequence[float], chain: float) -> float:
'''
assert old in s
s = s.replace(old, old + '''        import os
        if os.environ.get("EDGESPEC_DIAG_NO_TREES"):
            self._shape = None
            self._tree_probe = None
            return chain
''')
open(p, 'w').write(s)
