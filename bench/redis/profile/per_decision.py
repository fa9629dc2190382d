#!/usr/bin/env python3
"""Per-decision cost of decide.lua without the per-call part: wraps the
script so one EVAL calls its per-decision function N times per case.

    python3 bench/redis/profile/per_decision.py crates/store/src/redis/decide.lua 20000 /tmp/one.lua
    redis-cli -p PORT --eval /tmp/one.lua      # µs per decision, per case
"""
import sys
src=open(sys.argv[1]).read()
n=int(sys.argv[2])
i=src.index("local out, keybase = {}, 0")
body=src[:i].replace("KEYS[","K[").replace("#ARGV","#A").replace("local argv = ARGV","local argv = A")
cases={
 'fw': ("{'bench:fw'}", "{'d', '', '1', '1', '10', 'f', '1', '1', '0', '0', '0', '1000000000', 'F', '60000000000', '0'}"),
 'fw_deny': ("{'bench:fwd'}", "{'d', '', '1', '1', '10', 'f', '1', '1', '0', '0', '0', '1', 'F', '60000000000', '0'}"),
 'tb': ("{'bench:tb'}", "{'d', '', '1', '1', '13', 'g', '1', '1', '0', '0', '0', '1000000000', '1000000', '1000000000', '0', '1000', '1000000000000', '0'}"),
 'tb_deny': ("{'bench:tbd'}", "{'d', '', '0', '1', '13', 'g', '1', '1', '0', '0', '0', '100', '1000', '1000000000', '1000000', '0', '100000000000', '0'}"),
}
out=['local res = {}','local function t() local x = redis.call(\'TIME\') return tonumber(x[1])*1e6 + tonumber(x[2]) end']
for name,(k,a) in cases.items():
    out.append('do\nlocal K, A = %s, %s\n%s\nlocal a = t()\nfor i = 1, %d do pos = 1; one(0) end\nlocal b = t()\nres[#res+1] = "%s=" .. string.format("%%.2f", (b - a) / %d)\nend' % (k, a, body, n, name, n))
out.append('return res')
open(sys.argv[3],'w').write("\n".join(out))
