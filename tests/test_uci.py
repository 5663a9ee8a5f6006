"""UCI reading: the file parser, `uci show` output, and the choice between them."""

import logging
import os
import shutil

import pytest

from spotfi_agent import uci


def write_config(tmp_path, text, name="spotfi"):
    directory = str(tmp_path) + "/etc/config"
    os.makedirs(directory, exist_ok=True)
    path = directory + "/" + name
    with open(path, "w") as handle:
        handle.write(text)
    return path


def uci_test_double(output, status=0, error=None):
    """Stand-in for the `uci` command, which OpenWrt has and this machine does not."""
    calls = []

    def run(argv):
        calls.append(list(argv))
        if error is not None:
            raise error
        return status, output

    run.calls = calls
    return run


def only_section(text):
    sections = uci.parse_config(text)
    assert len(sections) == 1
    return sections[0]


def test_parse_config_quoting_styles():
    section = only_section(
        "config agent 'main'\n"
        "\toption single 'one two'\n"
        '\toption double "three four"\n'
        "\toption bare five\n"
        "\toption empty ''\n"
    )
    assert section.type == "agent"
    assert section.name == "main"
    assert section.options["single"] == "one two"
    assert section.options["double"] == "three four"
    assert section.options["bare"] == "five"
    assert section.options["empty"] == ""


def test_parse_config_escaped_quotes():
    section = only_section(
        "config agent main\n"
        "\toption written 'it'\\''s'\n"
        '\toption double "say \\"hi\\""\n'
        "\toption mixed 'a'\"b\"c\n"
        "\toption backslash 'a\\b'\n"
    )
    assert section.options["written"] == "it's"
    assert section.options["double"] == 'say "hi"'
    assert section.options["mixed"] == "abc"
    assert section.options["backslash"] == "a\\b"


def test_parse_config_comments_and_blank_lines():
    section = only_section(
        "# top comment\n"
        "\n"
        "config agent 'main'  # trailing comment\n"
        "    # indented comment\n"
        "\n"
        "\toption token 'a#b'  # the hash inside quotes stays\n"
        "\toption bare x#y\n"
        "#\toption commented 'out'\n"
    )
    assert section.options == {"token": "a#b", "bare": "x#y"}


def test_parse_config_crlf_line_endings():
    section = only_section("config agent 'main'\r\n\toption token 'abc'\r\n")
    assert section.options == {"token": "abc"}


def test_parse_config_list_options():
    section = only_section(
        "config agent 'main'\n"
        "\tlist broker 'mqtts://a'\n"
        "\tlist broker 'mqtts://b'\n"
        "\toption single 'x'\n"
        "\tlist single 'y'\n"
    )
    assert section.options["broker"] == ["mqtts://a", "mqtts://b"]
    assert section.options["single"] == ["x", "y"]


def test_parse_config_option_replaces_list():
    section = only_section(
        "config agent 'main'\n"
        "\tlist broker 'a'\n"
        "\toption broker 'b'\n"
    )
    assert section.options["broker"] == "b"


def test_parse_config_several_sections():
    sections = uci.parse_config(
        "config other 'first'\n"
        "\toption token 'wrong'\n"
        "config agent\n"
        "\toption token 'unnamed'\n"
        "config agent 'main'\n"
        "\toption token 'right'\n"
    )
    assert [(section.type, section.name) for section in sections] == [
        ("other", "first"), ("agent", None), ("agent", "main")]
    assert sections[1].options["token"] == "unnamed"
    assert sections[2].options["token"] == "right"


def test_parse_config_same_name_sections_merge():
    sections = uci.parse_config(
        "config agent 'main'\n"
        "\toption token 'a'\n"
        "\tlist broker 'x'\n"
        "config agent 'main'\n"
        "\toption keepalive '90'\n"
        "\tlist broker 'y'\n"
    )
    assert len(sections) == 1
    assert sections[0].options == {"token": "a", "broker": ["x", "y"], "keepalive": "90"}


def test_parse_config_package_line_ignored():
    sections = uci.parse_config("package spotfi\n\nconfig agent 'main'\n\toption a '1'\n")
    assert len(sections) == 1
    assert sections[0].options == {"a": "1"}


def test_parse_config_bad_lines_skipped(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.uci")
    sections = uci.parse_config(
        "option orphan 'x'\n"
        "config agent 'main'\n"
        "\toption novalue\n"
        "\toption bad-key 'x'\n"
        "\tsomething 'else'\n"
        "\toption good 'yes'\n",
        "test.conf",
    )
    assert sections[0].options == {"good": "yes"}
    assert "test.conf line 1" in caplog.text
    assert "test.conf line 3" in caplog.text
    assert "test.conf line 4" in caplog.text
    assert "test.conf line 5" in caplog.text


def test_parse_config_unterminated_quote(caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.uci")
    sections = uci.parse_config(
        "config agent 'main'\n"
        "\toption good 'yes'\n"
        "\toption broken 'no end\n",
        "test.conf",
    )
    assert sections[0].options == {"good": "yes"}
    assert "test.conf line 3: unterminated quote" in caplog.text


def test_parse_config_multiline_quoted_value():
    section = only_section("config agent 'main'\n\toption text 'one\ntwo'\n\toption after '1'\n")
    assert section.options == {"text": "one\ntwo", "after": "1"}


def test_parse_show_output():
    sections = uci.parse_show(
        "spotfi.main=agent\n"
        "spotfi.main.token='abc'\n"
        "spotfi.main.broker='mqtts://a' 'mqtts://b'\n"
        "spotfi.main.quote='it'\\''s'\n"
        "spotfi.@agent[0]=agent\n"
        "spotfi.@agent[0].token='unnamed'\n"
        "other.main.token='ignored'\n",
        "spotfi",
    )
    assert len(sections) == 2
    assert sections[0].name == "main"
    assert sections[0].type == "agent"
    assert sections[0].options == {
        "token": "abc", "broker": ["mqtts://a", "mqtts://b"], "quote": "it's"}
    assert sections[1].name is None
    assert sections[1].options == {"token": "unnamed"}


def test_read_section_named(tmp_path):
    path = write_config(tmp_path, "config other 'main2'\n\toption x '1'\n"
                                  "config agent 'main'\n\toption token 'abc'\n")
    section = uci.read_section(path, "main", "agent")
    assert section.name == "main"
    assert section.options == {"token": "abc"}


def test_read_section_missing_file(tmp_path):
    assert uci.read_section(str(tmp_path) + "/nothing", "main", "agent") is None


def test_read_section_other_sections_ignored(tmp_path):
    path = write_config(tmp_path, "config other 'x'\n\toption token 'abc'\n")
    assert uci.read_section(path, "main", "agent") is None


def test_read_section_unnamed_fallback(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.uci")
    path = write_config(tmp_path, "config agent\n\toption token 'first'\n"
                                  "config agent\n\toption token 'second'\n")
    section = uci.read_section(path, "main", "agent")
    assert section.options == {"token": "first"}
    assert "config agent 'main'" in caplog.text


def test_read_section_through_uci_command(tmp_path):
    path = write_config(tmp_path, "config agent 'main'\n\toption token 'from-file'\n")
    run = uci_test_double("spotfi.main=agent\nspotfi.main.token='from-command'\n")
    section = uci.read_section(path, "main", "agent", run)
    assert section.options == {"token": "from-command"}
    assert run.calls == [["uci", "-c", str(tmp_path) + "/etc/config", "-q", "show", "spotfi"]]


def test_read_section_default_config_dir_argv():
    run = uci_test_double("spotfi.main=agent\nspotfi.main.token='x'\n")
    uci.read_section("/etc/config/spotfi", "main", "agent", run)
    assert run.calls == [["uci", "-q", "show", "spotfi"]]


def test_read_section_command_failure_reads_file(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spotfi_agent.uci")
    path = write_config(tmp_path, "config agent 'main'\n\toption token 'from-file'\n")
    run = uci_test_double("", status=1)
    section = uci.read_section(path, "main", "agent", run)
    assert section.options == {"token": "from-file"}
    assert "exit status 1" in caplog.text


def test_read_section_command_missing_reads_file(tmp_path):
    path = write_config(tmp_path, "config agent 'main'\n\toption token 'from-file'\n")
    run = uci_test_double("", error=OSError("No such file or directory"))
    section = uci.read_section(path, "main", "agent", run)
    assert section.options == {"token": "from-file"}


def test_find_command_needs_executable(tmp_path):
    directory = str(tmp_path)
    for name, mode in (("uci", 0o755), ("plain", 0o644)):
        with open(directory + "/" + name, "w") as handle:
            handle.write("#!/bin/sh\n")
        os.chmod(directory + "/" + name, mode)
    assert uci.find_command("uci", "/nonexistent:" + directory) == directory + "/uci"
    assert uci.find_command("plain", directory) is None
    assert uci.find_command("uci", "") is None
    assert uci.find_command("uci", None) is None


def test_run_subprocess_returns_status_and_output():
    status, output = uci.run_subprocess(["sh", "-c", "echo hello; exit 3"])
    assert status == 3
    assert output == "hello\n"


@pytest.mark.skipif(shutil.which("uci") is None, reason="the uci command is not installed")
def test_read_section_real_uci_matches_parser(tmp_path):
    text = (
        "config agent 'main'\n"
        "\toption token 'abc'\n"
        "\toption quote 'it'\\''s'\n"
        "\tlist broker 'mqtts://a'\n"
        "\tlist broker 'mqtts://b'\n"
        "config other 'x'\n"
        "\toption token 'ignored'\n"
    )
    path = write_config(tmp_path, text)
    through_command = uci.read_section(path, "main", "agent", uci.run_subprocess)
    parsed = uci.read_section(path, "main", "agent")
    assert through_command.options == parsed.options
    assert through_command.options["quote"] == "it's"
