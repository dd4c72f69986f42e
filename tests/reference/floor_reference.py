"""The evaluation floor by a plain loop over stored probe rows: the reference the floor tests
compare the search's own estimate (``noise_model.floor_noise``) and fast mode's descent with."""


def plain_floor(probes):
    """({ulps: probe count}, per prompt (p1, p4, (16 p1 - p4) / 15 kept within [0, p1])), p1 / p4 the
    mean noise powers at 1 / 4 ulps."""
    power = {1: [], 4: []}
    for m in probes:
        power[m.position or 1].append([10 ** (-v / 10) for v in m.per_prompt])
    rows = []
    for i in range(len(power[1][0])):
        p1 = sum(r[i] for r in power[1]) / len(power[1])
        p4 = sum(r[i] for r in power[4]) / len(power[4])
        rows.append((p1, p4, min(max((16 * p1 - p4) / 15, 0.0), p1)))
    return {u: len(v) for u, v in power.items()}, rows
