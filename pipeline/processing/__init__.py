"""The run loop: the processor, its ledger, recovery policies, events, the reader pool, and how ``ttt-stream run`` wires them."""
