#!/bin/sh
# Stand-in for the part of OpenWrt's /lib/functions.sh that package scripts
# call: default_postinst and default_prerm, which the postinst and prerm that
# OpenWrt's package.mk generates run as `default_postinst $0 "$@"`. The
# config_* helpers and everything else that needs the uci binary are absent.

# The package name is the script's file name without .postinst or .prerm:
# scripts run from /usr/lib/opkg/info/<package>.<script>.
_standin_package_list() {
	pkgname="${1##*/}"
	pkgname="${pkgname%.*}"
	echo "${IPKG_INSTROOT}/usr/lib/opkg/info/${pkgname}.list"
}

default_postinst() {
	filelist="$(_standin_package_list "$1")"

	# uci-defaults scripts run once, in their directory, and go on exit 0.
	if [ -z "$IPKG_INSTROOT" ]; then
		for script in $(grep -s "^/etc/uci-defaults/" "$filelist"); do
			[ -f "$script" ] || continue
			if ( cd "${script%/*}" && . "$script" ); then
				rm -f "$script"
			fi
		done
	fi

	for initscript in $(grep -s "^/etc/init.d/" "$filelist"); do
		if [ -n "$IPKG_INSTROOT" ]; then
			continue
		fi
		[ "$PKG_UPGRADE" = 1 ] || "$initscript" enable
		"$initscript" start
	done
	return 0
}

default_prerm() {
	filelist="$(_standin_package_list "$1")"

	for initscript in $(grep -s "^/etc/init.d/" "$filelist"); do
		[ -n "$IPKG_INSTROOT" ] && continue
		[ "$PKG_UPGRADE" = 1 ] || "$initscript" disable
		"$initscript" stop
	done
	return 0
}
