"""Counts the atomic read-modify-write instructions a program ran, from a
callgrind profile made with --dump-instr=yes: the instructions of BINARY
that carry a `lock` prefix, or exchange with memory (`xchg`, locked
without one), as objdump disassembles it, weighted by how often callgrind
saw each run.

    python3 bench/locked.py PROFILE BINARY
prints the total.
"""

import re
import subprocess
import sys


def locked_addresses(binary):
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", binary],
        capture_output=True, text=True, check=True,
    ).stdout
    addresses = set()
    for line in listing.splitlines():
        match = re.match(r"^\s*([0-9a-f]+):\t(.*)$", line)
        if not match:
            continue
        instruction = match.group(2)
        if instruction.startswith("lock ") or (
            instruction.startswith("xchg") and "(" in instruction
        ):
            addresses.add(int(match.group(1), 16))
    return addresses


def main(profile, binary):
    locked = locked_addresses(binary)
    objects = {}
    current = None
    after_call = False
    address = 0
    total = 0
    with open(profile) as lines:
        for line in lines:
            line = line.rstrip("\n")
            named = re.match(r"^(ob|cob)=\((\d+)\)(?: (.*))?$", line)
            if named:
                kind, index, name = named.groups()
                if name:
                    objects[index] = name
                if kind == "ob":
                    current = objects.get(index)
                continue
            if line.startswith("calls="):
                # The next cost line is the call's inclusive cost.
                after_call = True
                continue
            if not line or line[0] not in "0123456789+-*":
                continue
            fields = line.split()
            position = fields[0]
            if position.startswith("0x"):
                address = int(position, 16)
            elif position.startswith("+"):
                address += int(position[1:], 16)
            elif position.startswith("-"):
                address -= int(position[1:], 16)
            elif position != "*":
                continue
            if after_call:
                after_call = False
                continue
            if len(fields) >= 3 and current == binary and address in locked:
                total += int(fields[2])
    print(total)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
