"""ComfyUI node layer: translates ComfyUI types into `ipa_train` calls. No math lives here."""
