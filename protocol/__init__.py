"""The wire contract of the distillation teacher service.

`protocol.v1` holds the `.proto` and its generated code; `protocol.codec` turns tensors into bytes
and back (validated); `protocol.errors` is the one error model both sides share. The teacher server
and the student client import this package and nothing of each other.
"""
