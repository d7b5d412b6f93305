"""One INSERT for N devices over MQTT through a real Mosquitto, against UDP in the same run."""
