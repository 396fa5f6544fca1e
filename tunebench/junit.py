"""`tunebench check --junit FILE`: the gate's cases as JUnit XML, the test-report format CI systems read.

    <testsuites name="tunebench check" tests= failures= errors= time=>
      <testsuite name="tunebench.check.KERNEL" tests= failures= errors= skipped="0" time= timestamp= hostname=>
        <properties><property name="device" value=.../> ...</properties>
        <testcase classname="tunebench.check.KERNEL" name="[i] problem config seed layout" time=>
          <failure type="AssertionError" message=REASON>REASON + the `tunebench check ...` line that replays it</failure>
        </testcase>

One <testcase> per example Hypothesis ran (its shrinking of a failure included); a kernel whose run failed outside
any recorded case (Hypothesis itself, a strategy) gets one more <testcase> with an <error>.
"""
from __future__ import annotations

import datetime
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from .gate import GateStats


def junit_tree(all_stats: list[GateStats], properties: dict[str, str]) -> ET.ElementTree:
    root = ET.Element("testsuites", name="tunebench check")
    for stats in all_stats:
        root.append(_suite(stats, properties))
    for attr in ("tests", "failures", "errors"):
        root.set(attr, str(sum(int(s.get(attr)) for s in root)))
    root.set("time", f"{sum(float(s.get('time')) for s in root):.3f}")
    return ET.ElementTree(root)


def _suite(stats: GateStats, properties: dict[str, str]) -> ET.Element:
    classname = f"tunebench.check.{stats.kernel}"
    suite = ET.Element("testsuite", name=classname, skipped="0", hostname=socket.gethostname(),
                       timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    props = ET.SubElement(suite, "properties")
    for name, value in properties.items():
        ET.SubElement(props, "property", name=name, value=str(value))
    failures = errors = 0
    for i, case in enumerate(stats.cases):
        testcase = ET.SubElement(suite, "testcase", classname=classname, name=f"[{i}] {case.name}",
                                 time=f"{case.seconds:.3f}")
        if case.failure:
            failures += 1
            failure = ET.SubElement(testcase, "failure", type="AssertionError", message=case.failure)
            failure.text = f"{case.failure}\nreproduce: {case.repro}\n"
    if stats.failures and not failures:           # the run broke outside any recorded case
        errors = 1
        _, reason = stats.failures[-1]
        testcase = ET.SubElement(suite, "testcase", classname=classname, name="(gate run)", time="0")
        ET.SubElement(testcase, "error", type="Error", message=reason).text = reason
    suite.set("tests", str(len(stats.cases) + errors))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("time", f"{sum(c.seconds for c in stats.cases):.3f}")
    return suite


def write_junit(all_stats: list[GateStats], path: str | Path, properties: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = junit_tree(all_stats, properties)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path
